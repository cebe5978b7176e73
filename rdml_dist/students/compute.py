"""How one student's forward and backward run on its device: precision, memory format and compilation.

The student's step (:mod:`rdml_dist.students.student`) asks this for its forward and for the backward
and optimizer step; what GPU users turn on (``training.compute``) lives here alone:

- ``bf16``/``fp16``: the forward under ``torch.autocast``; the loss is formed in float32 from
  the logits. ``fp16`` scales the loss with a ``GradScaler``: a step whose scaled gradients
  overflow is skipped and the scale lowered, as the scaler does, and counted in
  :attr:`skipped_steps`, never as a failure. The scaler's state is part of the checkpoint.
- ``channels_last``: the model's 4-d weights and every 4-d input batch in that memory format.
- ``compile``: ``torch.compile`` of the model, compiled once when the student starts (a forward
  and backward on example batches of every training batch size, effects undone), so that no training
  step's time holds compilation; :attr:`compile_seconds` reports it. A refresh forward (sequential
  updates) and the first evaluation compile their own graphs when they first run.
"""

import copy
import time
from typing import Any

import torch
from torch import Tensor, nn

from rdml_dist.config.schema import ComputeConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepCompute:
    """One student's forward, backward and optimizer step, run as its ``ComputeConfig`` says."""

    def __init__(self, settings: ComputeConfig, model: nn.Module, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.model = model.to(memory_format=torch.channels_last) if settings.channels_last else model
        self._autocast_dtype = AUTOCAST_DTYPES.get(settings.precision)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=settings.fp16_init_scale, enabled=settings.precision == "fp16")
        self._forward: nn.Module = torch.compile(self.model, backend=settings.compile_backend) if settings.compile else self.model
        self.compile_seconds = 0.0
        self.skipped_steps = 0

    def prepare(self, inputs: Tensor) -> Tensor:
        """An input batch on the device, in the model's memory format."""
        inputs = inputs.to(self.device, non_blocking=True)
        if self.settings.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def forward(self, inputs: Tensor) -> Tensor:
        """The model's logits for a prepared batch (under autocast for ``bf16``/``fp16``; their dtype follows it)."""
        if self._autocast_dtype is None:
            return self._forward(inputs)
        with torch.autocast(self.device.type, dtype=self._autocast_dtype):
            return self._forward(inputs)

    def to_host(self, *tensors: Tensor) -> list[Tensor]:
        """``tensors`` detached on the host with one wait for the device: each copied without blocking (into pinned
        memory) and the stream synchronised once, not once per tensor; on the CPU they are already there."""
        if self.device.type != "cuda":
            return [tensor.detach() for tensor in tensors]
        copies = [tensor.detach().to("cpu", non_blocking=True) for tensor in tensors]
        torch.cuda.current_stream(self.device).synchronize()
        return copies

    def backward_and_step(self, ce: Tensor, logits: Tensor, mimicry_grad: Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Backward of the float32 cross-entropy ``ce`` with ``mimicry_grad`` fed straight into ``logits`` (float32; the
        same sum as a backward of ``ce + (logits * mimicry_grad).sum()``, bit for bit, without that product's graph),
        then the optimizer's step; False when the scaler skipped an overflowing step."""
        optimizer.zero_grad(set_to_none=True)
        if not self.scaler.is_enabled():
            torch.autograd.backward([ce, logits], [None, mimicry_grad])
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        torch.autograd.backward([self.scaler.scale(ce), logits], [None, self.scaler.scale(mimicry_grad)])
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skipped the step
        self.skipped_steps += not stepped
        return stepped

    def compile_now(self, examples: list[Tensor]) -> None:
        """Compile the forward and backward before the first step, on prepared batches of every training batch size.

        Batch-norm statistics, gradients and the RNG streams are left as they were.
        """
        started = time.perf_counter()
        saved = copy.deepcopy(self.model.state_dict())
        was_training = self.model.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.model.train()
            for example in examples:
                self.forward(example).float().sum().backward()
        self.model.load_state_dict(saved)
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        self.compile_seconds = time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the scaler (a checkpoint without one, written before fp16 or by an fp32 student, leaves it fresh)."""
        if state is None:
            return
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state["skipped_steps"])
