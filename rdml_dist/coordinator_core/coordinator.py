"""The transport-free coordinator core: collect frames, validate, compute mimicry gradients, keep cohort state.

Plain Python and torch, no Ray and no sockets: the in-process trainer calls it directly, the Ray
actor (and any other transport) is a thin adapter that adds waiting. It is the single source of
cohort state: the step, the members and which are live, per-student losses and measures.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rdml_dist.config import ExperimentConfig
from rdml_dist.data.batch_plan import batch_plan, indices_hash
from rdml_dist.devices import resolve_device
from rdml_dist.divergence import MimicryResult, MimicryWorkspace, mimicry_gradients, stack_by_sample
from rdml_dist.errors import FrameRejected
from rdml_dist.finite import all_finite
from rdml_dist.messages import (
    BATCH_MISMATCH, DATA_MISMATCH, DUPLICATE, NON_FINITE, NOT_LIVE, UNKNOWN_STUDENT, WRONG_SHAPE, WRONG_STEP,
    EpochEvaluation, EvalFrame, LogitsFrame, MimicryReply, StepRecord, StepMeasures, StudentInfo,
)
from rdml_dist.schedules import alpha_at, mimicry_weight_at
from rdml_dist.coordinator_core.shards import shard_rows


@dataclass(frozen=True)
class PendingStep:
    """The inputs of one computation, taken at :meth:`CohortCoordinator.begin_step`: a step, or one sequential turn.

    ``names``/``frames``/``arrivals``: every student whose frame takes part, in member order;
    ``answered``: those who get their gradient from it (all of them, one turn, or nobody);
    ``refresh_after``: a sequential turn's student whose refreshed logits the next turn needs;
    ``final``: nobody is left to answer after it, so the step ends with it.
    """

    step: int
    generation: int
    names: list[str]
    answered: list[str]
    refresh_after: str | None
    final: bool
    frames: list[LogitsFrame]
    arrivals: list[float]
    alpha: float
    weight: float
    started: float


class CohortCoordinator:
    """Per-step barrier logic and the batched mimicry computation, without any transport.

    As shard ``shard`` of ``shards`` (the Ray engine's ``runtime.coordinator.shards``) it takes its rows
    of every frame (:func:`rdml_dist.coordinator_core.shards.shard_rows`) and weights the gradients by their share of the
    batch; losses and records are means over its rows (the student and the driver average them by rows).
    """

    def __init__(
        self, config: ExperimentConfig, clock: Callable[[], float] = time.perf_counter, shard: int = 0, shards: int = 1
    ) -> None:
        self.config = config
        shard_rows(1, shards, shard)  # refuses an index outside the shards
        self.shard, self.shards = shard, shards
        self.members: list[str] = config.student_names()
        self.live: set[str] = set()
        self._joined_at: dict[str, int] = {}  # the step each external student last joined at
        self.clock = clock
        # With a GPU in its bundle the batched computation runs there; replies always leave on the CPU.
        self.device = resolve_device(config.runtime.device) if config.runtime.coordinator.gpus > 0 else torch.device("cpu")
        # Reused every step: a computation's result lives here until finish_step has made the replies and
        # records (new tensors and floats); the next begin_step comes after that, so it may overwrite them.
        self._workspace = MimicryWorkspace()
        self.info: dict[str, StudentInfo] = {}
        self.step = 0
        self.generation = 0  # counts restores: a computation begun before one is discarded
        self._pending: dict[str, LogitsFrame] = {}
        self._arrivals: dict[str, float] = {}
        self._excluded: set[str] = set()
        self._plan_cache: tuple[int, list[str]] | None = None
        self._eval_frames: dict[int, dict[str, EvalFrame]] = {}
        self.records: dict[int, dict[str, StepRecord]] = {}
        self.evaluations: dict[int, EpochEvaluation] = {}
        self.latest: dict[str, StepRecord] = {}  # each student's newest record, kept for status displays
        self.samples_per_second: dict[str, float] = {}  # for status displays and the metrics alike
        self.compute_seconds: dict[str, float] = {}  # each student's latest own measure of its step's compute
        self._last_computed: dict[str, float] = {}
        self._turns: list[str] | None = None  # sequential update: students of this step still to be answered
        self._refreshing: str | None = None  # sequential update: the answered student whose refreshed logits come next
        self._in_flight = False  # between begin_step and finish_step: frames of this step come too late

    # -- membership -------------------------------------------------------------------------
    def register(self, info: StudentInfo) -> None:
        """Admit a student; its data must agree with the students already registered."""
        if info.name not in self.members:
            raise FrameRejected(f"unknown student {info.name!r} (members: {', '.join(self.members)})", UNKNOWN_STUDENT)
        for other in self.info.values():
            for attribute in ("num_train", "num_val", "num_classes", "steps_per_epoch", "data_fingerprint"):
                if other.name != info.name and getattr(info, attribute) != getattr(other, attribute):
                    raise FrameRejected(
                        f"student {info.name!r} has {attribute}={getattr(info, attribute)} but "
                        f"{other.name!r} has {getattr(other, attribute)}: students must load the same data",
                        DATA_MISMATCH,
                    )
        self.info[info.name] = info
        self.live.add(info.name)

    def join(self, info: StudentInfo) -> None:
        """An external student (re)joins at the current step: it takes part in the epochs that end after it, and
        the scores of one that ended before are not waited for (it never trained that epoch's end)."""
        self.register(info)
        self._joined_at[info.name] = self.step

    def mark_dead(self, name: str) -> None:
        """Stop waiting for a student; mimicry then averages over the remaining live peers."""
        self.live.discard(name)
        self._pending.pop(name, None)
        self._arrivals.pop(name, None)
        if self._turns is not None and name in self._turns:
            self._turns.remove(name)
        if self._refreshing == name:
            self._refreshing = None

    def revive(self, name: str) -> None:
        """A restarted student rejoins; it takes part from the next step it submits."""
        if name not in self.info:
            raise FrameRejected(f"student {name!r} never registered", UNKNOWN_STUDENT)
        self.live.add(name)

    def restore(self, step: int) -> None:
        """Go back (or forward, after a coordinator restart) to the start of ``step``: a cohort checkpoint.

        In-flight frames, the records of later steps and the evaluations of unfinished epochs are dropped.
        """
        self.step = step
        self.generation += 1
        self._clear_step()
        self.records = {kept: rows for kept, rows in self.records.items() if kept < step}
        finished_epochs = step // self.steps_per_epoch if self.info else 0
        self.evaluations = {epoch: scores for epoch, scores in self.evaluations.items() if epoch < finished_epochs}
        self._eval_frames = {epoch: frames for epoch, frames in self._eval_frames.items() if epoch < finished_epochs}
        self._joined_at = {name: min(joined, step) for name, joined in self._joined_at.items()}

    @property
    def steps_per_epoch(self) -> int:
        if not self.info:
            raise RuntimeError("no student has registered yet")
        return next(iter(self.info.values())).steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    # -- validation -------------------------------------------------------------------------
    def expected_batch(self, step: int) -> tuple[str, int]:
        """The hash and size of the batch every student must use at ``step``, from the shared batch plan."""
        epoch = self.epoch_of(step)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            num_train = next(iter(self.info.values())).num_train
            training = self.config.training
            plan = batch_plan(num_train, training.batch_size, self.config.seed, epoch, training.drop_last)
            self._plan_cache = (epoch, [(indices_hash(indices), len(indices)) for indices in plan])
        return self._plan_cache[1][step % self.steps_per_epoch]

    def _validate(self, frame: LogitsFrame) -> None:
        if frame.student not in self.members:
            raise FrameRejected(f"unknown student {frame.student!r}", UNKNOWN_STUDENT)
        if frame.student not in self.live:
            raise FrameRejected(f"student {frame.student!r} is not a live member (register first)", NOT_LIVE)
        if frame.step != self.step:
            raise FrameRejected(f"frame from {frame.student!r} is for step {frame.step}, cohort is at step {self.step}", WRONG_STEP)
        if frame.student in self._pending:
            raise FrameRejected(f"duplicate frame from {frame.student!r} for step {frame.step}", DUPLICATE)
        if self._in_flight:  # too late to take part: as if it had come just after the computation
            raise FrameRejected(f"frame from {frame.student!r} for step {frame.step} came while its gradients were computed", WRONG_STEP)
        expected, batch_rows = self.expected_batch(frame.step)
        rows = self._rows_served(batch_rows)
        if frame.batch_hash != expected:
            raise FrameRejected(
                f"frame from {frame.student!r} at step {frame.step} has batch hash {frame.batch_hash}, expected {expected}",
                BATCH_MISMATCH,
            )
        logits = frame.logits
        num_classes = self.info[frame.student].num_classes
        if logits.dim() != 2 or tuple(logits.shape) != (rows, num_classes):
            raise FrameRejected(f"logits from {frame.student!r} have shape {tuple(logits.shape)}, expected {rows}×{num_classes}", WRONG_SHAPE)
        if not all_finite(logits) or not math.isfinite(frame.ce_loss):
            raise FrameRejected(f"frame from {frame.student!r} at step {frame.step} holds NaN or infinite values", NON_FINITE)

    def _rows_served(self, batch_rows: int) -> int:
        """How many of a ``batch_rows``-row batch this shard serves."""
        served = shard_rows(batch_rows, self.shards, self.shard)
        return served.stop - served.start

    # -- the step barrier -----------------------------------------------------------------
    def submit(self, frame: LogitsFrame) -> None:
        """Accept a valid frame for the current step, or exclude its sender from the step and raise.

        Excluding the sender lets its peers' step complete without it: a bad frame never
        poisons the peers' targets nor blocks them at the barrier. A stale frame (an earlier
        step, e.g. a retried call) is rejected without excluding its sender from the current step.
        """
        try:
            self._validate(frame)
        except FrameRejected:
            self.exclude(frame.student, frame.step)
            raise
        self._pending[frame.student] = frame
        self._arrivals[frame.student] = self.clock()
        self.record_measures(frame.student, frame.previous)

    def exclude(self, student: str, step: int) -> None:
        """Leave ``student`` out of the current step after refusing its frame for that step (peers must not wait).

        A frame for another step does not exclude its sender: a stale one (a retried call) or one
        from ahead of the cohort (a student that missed a rollback) is refused, and the cohort
        keeps waiting for the sender's frame of the current step.
        """
        if student in self.live and student not in self._pending and step == self.step:
            self._excluded.add(student)

    def is_done_with(self, student: str) -> bool:
        """Whether ``student`` has nothing left to do in the current step: refused, or answered and refreshed."""
        return student in self._excluded or (student in self.records.get(self.step, {}) and student != self._refreshing)

    def waiting_for(self) -> list[str]:
        """Live members whose frame for the current step has not arrived (and who were not excluded).

        In a sequential step under way: the student whose refreshed logits the next turn needs.
        """
        if self._refreshing is not None:
            return [self._refreshing]
        return [name for name in self.members if name in self.live and name not in self._pending and name not in self._excluded]

    def is_complete(self) -> bool:
        """Every live member has either sent its frame or been excluded from this step (and someone arrived),
        and no refreshed logits are awaited: the next gradient can be computed."""
        return bool(self._pending or self._excluded) and not self.waiting_for()

    def compute(self) -> dict[str, MimicryReply]:
        """Mimicry gradients for the current step; the step advances once every student has its gradient.

        ``simultaneous``: every student's, in one batched call, against the peers' pre-update logits.
        ``sequential`` (DML Algorithm 1): one student per call, in member order, against the latest
        logits of its peers; each but the last is asked to :meth:`refresh` its logits after its
        update, before the next student's gradient is computed. This is :meth:`begin_step`,
        :meth:`mimicry` and :meth:`finish_step` in one go.
        """
        pending = self.begin_step()
        return self.finish_step(pending, self.mimicry(pending))

    def begin_step(self) -> PendingStep:
        """Take the inputs of the next computation (a whole step, or a sequential turn) out of the barrier state.

        The heavy part, :meth:`mimicry`, needs nothing but the returned :class:`PendingStep`, so a
        transport may run it while the cohort's state stays available to others (status, control calls).
        """
        if not self.is_complete():
            raise RuntimeError(f"step {self.step} is still waiting for {', '.join(self.waiting_for())}")
        names = [name for name in self.members if name in self._pending]
        answered, refresh_after = names, None
        if self.config.mimicry.update == "sequential":
            if self._turns is None:
                self._turns = list(names)
            answered = self._turns[:1]  # none left: the step is over
            self._turns = self._turns[1:]
            if self._turns:
                refresh_after = answered[0]
        progress = self.step / self.steps_per_epoch
        self._in_flight = True
        return PendingStep(
            step=self.step,
            generation=self.generation,
            names=names,
            answered=answered,
            refresh_after=refresh_after,
            final=refresh_after is None,
            frames=[self._pending[name] for name in names],
            arrivals=[self._arrivals[name] for name in names],
            alpha=alpha_at(self.config.mimicry, progress, self.config.training.epochs),
            weight=mimicry_weight_at(self.config.mimicry, progress),
            started=self.clock(),
        )

    def mimicry(self, pending: PendingStep) -> MimicryResult | None:
        """The batched computation of ``pending`` (gradients and losses on the CPU); None when nobody is answered.

        It touches only ``pending`` and this core's workspace: one computation at a time, whatever else goes on.
        """
        if not pending.answered:  # every live frame refused, or the last sequential turn done: no exchange
            return None
        mimicry = self.config.mimicry
        result = mimicry_gradients(
            stack_by_sample([frame.logits for frame in pending.frames], self.device, self._workspace),  # any wire dtype
            alpha=pending.alpha,
            temperature=mimicry.temperature,
            mode=mimicry.mode,
            divergence=mimicry.divergence,
            with_targets=False,
            workspace=self._workspace,
        )
        return MimicryResult(None, result.grads.cpu(), result.losses.cpu())

    def finish_step(self, pending: PendingStep, result: MimicryResult | None) -> dict[str, MimicryReply]:
        """Replies and step records from ``result``; the step advances when nobody is left to answer.

        A computation begun before a :meth:`restore` answers nobody and changes nothing.
        """
        if pending.generation != self.generation:
            return {}
        self._in_flight = False
        replies = {} if result is None else self._answer(pending, result)
        if pending.refresh_after in self.live:  # one who left meanwhile is not waited for: the next turn goes
            self._refreshing = pending.refresh_after
        if pending.final:
            if result is not None:
                self._measure_throughput(pending.names, self.expected_batch(self.step)[1], self.clock())
            self._advance()
        return replies

    def refresh(self, frame: LogitsFrame) -> None:
        """Sequential update: the student whose turn it was sends its logits of this step's batch after its update.

        Non-finite refreshed logits are not used (its peers keep its pre-update ones); its next
        forward will be refused and send it back to its checkpoint.
        """
        if self._refreshing != frame.student or frame.step != self.step:
            raise FrameRejected(
                f"refresh from {frame.student!r} for step {frame.step}; the cohort waits for {self._refreshing!r} at step {self.step}",
                WRONG_STEP,
            )
        self._refreshing = None
        logits = frame.logits
        if tuple(logits.shape) == tuple(self._pending[frame.student].logits.shape) and all_finite(logits):
            self._pending[frame.student].logits = logits

    def _answer(self, pending: PendingStep, result: MimicryResult) -> dict[str, MimicryReply]:
        """Replies and step records for the answered students."""
        mimicry = self.config.mimicry
        batch_rows = self.expected_batch(self.step)[1]
        share = pending.frames[0].logits.shape[0] / batch_rows  # this shard's part of the batch mean (1 unsharded)
        scale = pending.weight * mimicry.temperature**2
        elapsed = self.clock() - pending.started
        last_arrival = max(pending.arrivals)
        epoch = self.epoch_of(self.step)
        losses = result.losses.tolist()
        replies: dict[str, MimicryReply] = {}
        step_records = self.records.setdefault(self.step, {})
        for position, (name, frame, arrival) in enumerate(zip(pending.names, pending.frames, pending.arrivals)):
            if name not in pending.answered:
                continue
            divergence_value = losses[position]
            replies[name] = MimicryReply(
                step=self.step,
                grad=(result.grads[position] * (scale * share)).to(frame.logits.dtype),  # back in the dtype it was sent in
                mimicry_loss=scale * divergence_value,
                alpha=pending.alpha,
                weight=pending.weight,
                live_students=len(pending.names),
                refresh=pending.refresh_after == name,
            )
            step_records[name] = StepRecord(
                step=self.step,
                epoch=epoch,
                student=name,
                ce_loss=frame.ce_loss,
                mimicry_loss=scale * divergence_value,
                divergence=divergence_value,
                alpha=pending.alpha,
                weight=pending.weight,
                correct=frame.correct,
                labelled=frame.labelled,
                correct_clean=frame.correct_clean,
                rows=frame.logits.shape[0],
                wait_seconds=last_arrival - arrival,
                coordinator_seconds=elapsed,
            )
        self.latest.update({name: step_records[name] for name in replies})
        return replies

    def _measure_throughput(self, names: list[str], batch: int, now: float) -> None:
        """Samples per second of each student: its step's batch over the time since its previous step was computed."""
        for name in names:
            previous = self._last_computed.get(name)
            if previous is not None and now > previous:
                self.samples_per_second[name] = batch / (now - previous)
            self._last_computed[name] = now

    def _advance(self) -> None:
        self.step += 1
        self._clear_step()

    def _clear_step(self) -> None:
        self._pending.clear()
        self._arrivals.clear()
        self._excluded.clear()
        self._turns = None
        self._refreshing = None
        self._in_flight = False

    def record_measures(self, student: str, measures: StepMeasures | None) -> None:
        """Attach a student's own measures of an earlier step (compute, round trip, …) to that step's record, each
        to the field of its name.

        They travel in the student's next frame, or on their own at the end of a chunk of steps.
        """
        if measures is None:
            return
        self.compute_seconds[student] = measures.compute_seconds
        record = self.records.get(measures.step, {}).get(student)
        if record is not None:
            for name, value in measures.values().items():
                setattr(record, name, value)

    def pop_records(self, before_step: int) -> list[StepRecord]:
        """Hand over (and forget) the records of all steps before ``before_step``, in step order."""
        done = sorted(step for step in self.records if step < before_step)
        return [record for step in done for record in self.records.pop(step).values()]

    # -- evaluation -----------------------------------------------------------------------
    def unscored(self, epoch: int) -> list[str]:
        """Live members whose validation logits of ``epoch`` have not arrived (an external student that joined after
        the epoch's end sends none)."""
        sent = self._eval_frames.get(epoch, {})
        return [name for name in self.members  # a live member implies a registered one, so steps_per_epoch is known
                if name in self.live and name not in sent and self._joined_at.get(name, 0) < (epoch + 1) * self.steps_per_epoch]

    def submit_eval(self, frame: EvalFrame) -> EpochEvaluation | None:
        """Collect validation logits; once every live student has sent them, score students and ensemble."""
        if frame.student not in self.live:
            raise FrameRejected(f"evaluation from {frame.student!r}, which is not a live member")
        frames = self._eval_frames.setdefault(frame.epoch, {})
        for other in frames.values():
            if other.logits.shape != frame.logits.shape or not torch.equal(other.labels, frame.labels):
                raise FrameRejected(
                    f"validation output of {frame.student!r} does not match {other.student!r}'s (shape or labels)"
                )
        if not all_finite(frame.logits):
            raise FrameRejected(f"validation logits of {frame.student!r} hold NaN or infinite values")
        frames[frame.student] = frame
        self.record_measures(frame.student, frame.previous)
        return self.score_if_complete(frame.epoch)

    def score_if_complete(self, epoch: int) -> EpochEvaluation | None:
        """Score ``epoch`` once every live student has sent its validation logits (and someone has); once only."""
        if epoch in self.evaluations:  # a late frame for a scored epoch is not kept
            self._eval_frames.pop(epoch, None)
            return None
        frames = self._eval_frames.get(epoch)
        if not frames or self.unscored(epoch):
            return None
        evaluation = score_epoch(epoch, [frames[name] for name in self.members if name in frames])
        self.evaluations[epoch] = evaluation
        del self._eval_frames[epoch]
        return evaluation

    def state(self) -> dict[str, object]:
        """A snapshot of cohort state for progress displays and health checks."""
        return {
            "step": self.step,
            "members": list(self.members),
            "live": [name for name in self.members if name in self.live],
            "waiting_for": self.waiting_for() if self.info else [],
            "last_scored_epoch": max(self.evaluations, default=None),  # the scores themselves travel on request only
        }


def score_epoch(epoch: int, frames: Sequence[EvalFrame]) -> EpochEvaluation:
    """Accuracy of each student's argmax and of the mean of the students' probabilities."""
    labels = frames[0].labels
    accuracy = {frame.student: float((frame.logits.argmax(-1) == labels).float().mean()) for frame in frames}
    ensemble = torch.stack([frame.logits.softmax(-1) for frame in frames]).mean(0)
    ensemble_accuracy = float((ensemble.argmax(-1) == labels).float().mean())
    return EpochEvaluation(epoch, accuracy, ensemble_accuracy, [frame.student for frame in frames])
