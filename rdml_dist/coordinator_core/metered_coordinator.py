"""The coordinator core with its Prometheus metrics kept current: what every engine's coordinator runs.

The core itself stays free of metrics and transports; this subclass observes each of its
operations (frames accepted or refused, steps computed, measures, scores, membership) and
updates :class:`~rdml_dist.metrics.CohortMetrics`.
"""

import time
from collections.abc import Callable

from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator_core.coordinator import CohortCoordinator, PendingStep
from rdml_dist.divergence import MimicryResult
from rdml_dist.errors import FrameRejected
from rdml_dist.messages import EpochEvaluation, LogitsFrame, MimicryReply, StepMeasures, StudentInfo
from rdml_dist.metrics import CohortMetrics


class MeteredCoordinator(CohortCoordinator):
    """A :class:`CohortCoordinator` that reports to ``metrics`` as it goes."""

    def __init__(
        self, config: ExperimentConfig, metrics: CohortMetrics, clock: Callable[[], float] = time.perf_counter,
        shard: int = 0, shards: int = 1,
    ) -> None:
        super().__init__(config, clock, shard, shards)
        self.metrics = metrics
        self._measured_steps: dict[str, int] = {}  # the last step whose measures each student reported

    def register(self, info: StudentInfo) -> None:
        super().register(info)
        self.metrics.membership(self.live)

    def mark_dead(self, name: str) -> None:
        super().mark_dead(name)
        self.metrics.membership(self.live)

    def restore(self, step: int) -> None:
        super().restore(step)
        self.metrics.rolled_back(step, self.epoch_of(step))
        self.metrics.membership(self.live)

    def student_restarted(self, name: str) -> None:
        """The driver saw this student's process die; Ray is restarting it (it takes no part until restored)."""
        self.metrics.restarted(name)
        self.metrics.membership(self.live - {name})

    def submit(self, frame: LogitsFrame) -> None:
        try:
            super().submit(frame)
        except FrameRejected as rejected:
            self.metrics.frame_rejected(frame.student, rejected.reason)
            raise

    def refuse(self, student: str, step: int, reason: str) -> None:
        """A frame a transport could not even decode: counted like any refusal, and its sender left out of the step."""
        self.metrics.frame_rejected(student, reason)
        self.exclude(student, step)

    def finish_step(self, pending: PendingStep, result: MimicryResult | None) -> dict[str, MimicryReply]:
        replies = super().finish_step(pending, result)
        step = pending.step
        if pending.generation != self.generation or self.step == step:  # discarded, or a sequential step under way
            return replies
        records = self.records.get(step, {})
        batch = self.expected_batch(step)[1] if records else 0  # the whole batch, also on a coordinator shard
        self.metrics.step_computed(step, self.epoch_of(step), records, batch, self.samples_per_second)
        return replies

    def record_measures(self, student: str, measures: StepMeasures | None) -> None:
        super().record_measures(student, measures)
        if measures is not None and self._measured_steps.get(student) != measures.step:  # reported once, observed once
            self._measured_steps[student] = measures.step
            self.metrics.measures_reported(student, measures)

    def score_if_complete(self, epoch: int) -> EpochEvaluation | None:
        evaluation = super().score_if_complete(epoch)
        if evaluation is not None:
            self.metrics.epoch_scored(evaluation)
        return evaluation
