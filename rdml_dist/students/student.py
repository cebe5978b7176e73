"""One cohort member: its model, optimizer and data, and the two halves of a simultaneous step.

The same class runs inside the in-process trainer and inside a Ray actor, so both engines
follow the same trajectory. A step is split in two around the exchange: :meth:`Student.forward`
produces the logits frame (keeping the autograd graph), :meth:`Student.apply` receives the
mimicry gradient w.r.t. those logits, adds it to the cross-entropy backward and steps.
"""

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdml_dist.run_records.checkpoints import CheckpointStore, to_cpu
from rdml_dist.config import ExperimentConfig, OptimizerConfig, data_spec
from rdml_dist.data import augment_seed, batch_plan, data_fingerprint, indices_hash, load_dataset
from rdml_dist.data.split import Batch
from rdml_dist.devices import resolve_device
from rdml_dist.messages import NON_FINITE, EvalFrame, LogitsFrame, StepMeasures, StudentInfo
from rdml_dist.models import build_model
from rdml_dist.students.compute import StepCompute


def student_seed(seed: int, index: int) -> int:
    """Each student's own initialisation/dropout seed, derived from the experiment seed."""
    return seed * 1_000_003 + index


def build_optimizer(parameters: Iterator[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov by default, as in the papers) or Adam/AdamW from the config."""
    if config.name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    optimizer_class = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return optimizer_class(parameters, lr=config.lr, weight_decay=config.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: ExperimentConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule."""
    schedule = config.training.lr_schedule
    if schedule.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.training.epochs)
    if schedule.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestones, gamma=schedule.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


class Student:
    """A cohort member that loads its own data and computes the same batch plan as its peers."""

    def __init__(self, config: ExperimentConfig, index: int, device: torch.device | None = None) -> None:
        self.config = config
        self.index = index
        self.name = config.student_names()[index]
        self.device = device or resolve_device(config.runtime.device)
        self.wire_dtype: torch.dtype = getattr(torch, config.runtime.exchange.dtype)  # what its frames carry
        self.dataset = load_dataset(data_spec(config), config.seed)
        student_config = config.students[index]
        self._rng_state = torch.Generator().manual_seed(student_seed(config.seed, index)).get_state()
        self._cuda_rng_state = self._initial_cuda_rng_state()
        self._carried_cuda_rng_state: Tensor | None = None
        with self._own_rng():
            model = build_model(
                student_config.model,
                num_classes=self.dataset.num_classes,
                input_shape=self.dataset.input_shape,
                input_dtype=self.dataset.input_dtype,
                options=student_config.options,
                field=f"students.{index}.model",
            ).to(self.device)
        self.compute = StepCompute(student_config.compute or config.training.compute, model, self.device)
        self.model = self.compute.model
        self.optimizer = build_optimizer(self.model.parameters(), student_config.optimizer or config.training.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config)
        self.epoch = 0
        self.steps_per_epoch = len(self.plan(0))
        if self.compute.settings.compile:
            self.compute.compile_now([self.compute.prepare(batch) for batch in self._example_batches()])
        self._fingerprint = data_fingerprint(self.dataset)
        self._epoch_plan: tuple[int, list[Tensor]] | None = None
        self._feed: tuple[int, int, Iterator[tuple[Tensor, Batch]]] | None = None  # (epoch, next step, batches)
        self._pending: tuple[int, Tensor, Tensor, float] | None = None
        self._last_batch: tuple[int, Tensor, Tensor] | None = None  # (step, indices, inputs on the device)
        self.last_measures: StepMeasures | None = None  # this student's measurement of its latest step

    def _example_batches(self) -> list[Tensor]:
        """Batches of every training batch size a step can see (the last one of an epoch may be smaller)."""
        sizes = {len(indices) for indices in self.plan(0)}
        example = self.dataset.train.example()
        return [example.unsqueeze(0).expand(size, *example.shape).contiguous() for size in sorted(sizes)]

    def _initial_cuda_rng_state(self) -> Tensor | None:
        """The student's own CUDA generator state, seeded like its CPU stream (None on a CPU student)."""
        if self.device.type != "cuda":
            return None
        with torch.cuda.device(self.device):
            outer = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(student_seed(self.config.seed, self.index))
            state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer)
        return state

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with this student's private RNG streams (dropout, init): the CPU one and, on a GPU, its CUDA one."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        outer_cuda = None
        if self._cuda_rng_state is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._cuda_rng_state, self.device)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)
            if outer_cuda is not None:
                self._cuda_rng_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def info(self) -> StudentInfo:
        """Registration data the coordinator cross-checks between students."""
        return StudentInfo(
            name=self.name,
            num_train=len(self.dataset.train),
            num_val=len(self.dataset.val),
            num_classes=self.dataset.num_classes,
            steps_per_epoch=self.steps_per_epoch,
            data_fingerprint=self._fingerprint,
        )

    def plan(self, epoch: int) -> list[Tensor]:
        """The epoch's batches of training indices, identical in every student."""
        training = self.config.training
        return batch_plan(len(self.dataset.train), training.batch_size, self.config.seed, epoch, training.drop_last)

    def _training_batch(self, epoch: int, step_in_epoch: int) -> tuple[Tensor, Batch]:
        """The indices and prepared batch of a step, read on from the current pass when it is the next one.

        A pass over the rest of an epoch is started afresh after a jump (a new epoch, a
        restore), so streamed data prefetch ahead in order and in-memory data cost nothing extra.
        """
        if self._feed is None or self._feed[:2] != (epoch, step_in_epoch):
            if self._epoch_plan is None or self._epoch_plan[0] != epoch:
                self._epoch_plan = (epoch, self.plan(epoch))
            plan = self._epoch_plan[1][step_in_epoch:]
            seeds = [augment_seed(self.config.seed, epoch, step) for step in range(step_in_epoch, self.steps_per_epoch)]
            batches = self.dataset.train.batches(plan, seeds, pin_memory=self.device.type == "cuda")
            self._feed = (epoch, step_in_epoch, zip(plan, batches))
        indices, batch = next(self._feed[2])
        self._feed = (epoch, step_in_epoch + 1, self._feed[2])
        return indices, batch

    def forward_step(self, global_step: int) -> LogitsFrame:
        """Forward the batch the shared plan assigns to ``global_step``; keep the graph for :meth:`apply`."""
        started = time.perf_counter()
        indices, (inputs, labels) = self._training_batch(*divmod(global_step, self.steps_per_epoch))
        self.model.train()
        inputs, labels = self.compute.prepare(inputs), labels.to(self.device, non_blocking=True)
        with self._own_rng():
            logits = self.compute.forward(inputs)
        labelled_mask = labels >= 0
        labelled = labelled_mask.sum()
        # masked by where, not by indexing: a boolean index waits for the device to count the rows (a GPU sync)
        per_sample = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
        ce = torch.where(labelled_mask, per_sample, 0.0).sum() / labelled.clamp(min=1)
        predictions = logits.detach().argmax(-1)
        correct = ((predictions == labels) & labelled_mask).sum()
        # everything the frame needs from the device in one wait (one synchronisation on a GPU, not five)
        wire_logits, predictions, correct, labelled, ce_value = self.compute.to_host(
            logits.detach().to(self.wire_dtype), predictions, correct, labelled, ce)
        elapsed = time.perf_counter() - started
        self._pending = (global_step, logits, ce, elapsed)
        self._last_batch = (global_step, indices, inputs)
        return LogitsFrame(
            student=self.name,
            step=global_step,
            batch_hash=indices_hash(indices),
            logits=wire_logits,
            ce_loss=float(ce_value),
            correct=int(correct),
            labelled=int(labelled),
            correct_clean=int((predictions == self.dataset.train.clean_labels[indices]).sum()),
            previous=self.last_measures,
        )

    def apply(self, mimicry_grad: Tensor, round_trip_seconds: float = 0.0) -> None:
        """Backward CE plus the received mimicry gradient on the pending logits, then step.

        ``round_trip_seconds`` is the exchange as the caller measured it; with the compute time
        it travels to the coordinator in the next frame.
        """
        if self._pending is None:
            raise RuntimeError(f"student {self.name}: apply() called without a pending forward()")
        step, logits, ce, forward_seconds = self._pending
        self._pending = None
        started = time.perf_counter()
        grad = mimicry_grad.to(device=logits.device, dtype=torch.float32)
        self.compute.backward_and_step(ce, logits.float(), grad, self.optimizer)
        self.last_measures = StepMeasures(step, forward_seconds + time.perf_counter() - started, round_trip_seconds)

    @torch.no_grad()
    def refreshed_frame(self) -> LogitsFrame:
        """Sequential update: the logits of the step's batch again, after this student's update, for its later peers.

        The forward runs in training mode, as DML's Algorithm 1 recomputes predictions (batch
        statistics, dropout from the student's own stream).
        """
        if self._last_batch is None:
            raise RuntimeError(f"student {self.name}: refreshed_frame() called before any forward_step()")
        step, indices, inputs = self._last_batch
        self._last_batch = None
        with self._own_rng():
            logits = self.compute.forward(inputs).to(self.wire_dtype).cpu()
        return LogitsFrame(self.name, step, indices_hash(indices), logits, math.nan, 0, 0, 0)

    def discard_pending(self) -> None:
        """Forget the forward whose frame was refused (no gradient will come for it)."""
        self._pending = None

    def end_epoch(self) -> None:
        """Advance the per-epoch learning-rate schedule."""
        self.lr_scheduler.step()
        self.epoch += 1

    def advance_to_epoch(self, epoch: int) -> None:
        """Bring an older restored state's epoch counter and learning-rate schedule up to the cohort's ``epoch``."""
        while self.epoch < epoch:
            self.end_epoch()

    def back_off_learning_rate(self, factor: float) -> None:
        """Scale this student's learning rates (after a non-finite loss), keeping the schedule's shape."""
        if factor == 1.0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.lr_scheduler.base_lrs = [lr * factor for lr in self.lr_scheduler.base_lrs]

    @torch.no_grad()
    def evaluate(self, epoch: int) -> EvalFrame:
        """Validation logits for the whole split (the coordinator scores students and the ensemble)."""
        self.model.eval()
        chunks = list(torch.arange(len(self.dataset.val)).split(self.config.training.eval_batch_size))
        outputs, labels = [], []
        for inputs, batch_labels in self.dataset.val.batches(chunks, [None] * len(chunks), pin_memory=self.device.type == "cuda"):
            outputs.append(self.compute.forward(self.compute.prepare(inputs)).float().cpu())
            labels.append(batch_labels)
        return EvalFrame(
            student=self.name,
            epoch=epoch,
            logits=torch.cat(outputs),
            labels=torch.cat(labels),
            previous=self.last_measures,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this student exactly, as CPU tensors whatever the device.

        Weights, optimizer, schedule, epoch and both RNG streams (the CUDA one is kept even on a
        CPU student that restored a GPU checkpoint, so moving back to a GPU loses nothing).
        """
        return to_cpu({
            "name": self.name,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng_state": self._rng_state,
            "cuda_rng_state": self._cuda_rng_state if self._cuda_rng_state is not None else self._carried_cuda_rng_state,
            "compute": self.compute.state_dict(),
        })

    def restore_from(self, checkpoints: CheckpointStore, step: int, cohort_epoch: int) -> None:
        """Load this student's file of the cohort checkpoint at ``step`` and catch up with the cohort's epoch."""
        self.load_state_dict(checkpoints.load_student(step, self.name))
        self.advance_to_epoch(cohort_epoch)

    def recover_from_non_finite(self, checkpoints: CheckpointStore, restore_step: int, step: int, cause: str) -> dict[str, Any]:
        """Go back to the last checkpoint after a non-finite loss or logits (its peers never saw them).

        The learning rate is scaled by ``runtime.fault.nan_lr_backoff`` (1: unchanged). Returns the fault event.
        """
        self.restore_from(checkpoints, restore_step, step // self.steps_per_epoch)
        self.back_off_learning_rate(self.config.runtime.fault.nan_lr_backoff)
        return {"kind": NON_FINITE, "student": self.name, "step": step, "cause": cause,
                "action": f"restored its checkpoint of step {restore_step}"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (a checkpoint of the same student), onto this student's device."""
        if state["name"] != self.name:
            raise ValueError(f"checkpoint belongs to student {state['name']!r}, not {self.name!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the optimizer state to the parameters' device
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.compute.load_state_dict(state.get("compute"))  # absent from checkpoints written before it existed
        self._rng_state = state["rng_state"].cpu()
        saved_cuda = state.get("cuda_rng_state")
        if self.device.type == "cuda":
            self._cuda_rng_state = saved_cuda.cpu() if saved_cuda is not None else self._initial_cuda_rng_state()
        else:
            self._carried_cuda_rng_state = saved_cuda
        self.epoch = state["epoch"]
        self._pending = None
