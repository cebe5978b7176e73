"""The reference in-process cohort: every student in this process, the same math and loop as the Ray engine.

Students exchange nothing over a transport: their frames go straight into the same
:class:`~rdml_dist.coordinator_core.coordinator.CohortCoordinator` that the Ray coordinator actor wraps, so the
two engines follow the same trajectory for the same config and seed.
"""

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.failure_policy import FailurePolicy
from rdml_dist.engines.loop import RunObserver, train_loop
from rdml_dist.engines.session import RunSession, new_session
from rdml_dist.errors import FrameRejected
from rdml_dist.logs import logger
from rdml_dist.messages import NON_FINITE, EpochEvaluation, StepRecord
from rdml_dist.coordinator_core.metered_coordinator import MeteredCoordinator
from rdml_dist.metrics import CohortMetrics, FileSdEntry, LockedRegistry, metrics_address, serve
from rdml_dist.run_records.run_directory import RunDirectory
from rdml_dist.students.student import Student


class LocalCohort:
    """All students and the coordinator core in this process (no failures to survive but non-finite losses and the
    run's storage failing, which the policy answers by going back to the latest checkpoint)."""

    def __init__(self, config: ExperimentConfig, checkpoints: CheckpointStore) -> None:
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        self.checkpoints = checkpoints
        self.policy = FailurePolicy(config.runtime.fault)
        self.students = [Student(config, index) for index in range(len(config.students))]
        self.lock = threading.Lock()  # held for each step, so a scrape never sees half a step
        self.registry = LockedRegistry(self.lock)
        self.coordinator = MeteredCoordinator(config, CohortMetrics.for_config(config, self.registry))
        for student in self.students:
            self.coordinator.register(student.info())
        self.steps_per_epoch = self.coordinator.steps_per_epoch

    def run_steps(self, start: int, end: int, restore_step: int, on_progress: Callable[[int], None]) -> list[dict[str, Any]]:
        events = []
        for step in range(start, end):
            with self.lock:
                events.extend(self._step(step, restore_step))
            on_progress(step + 1)
        with self.lock:
            for student in self.students:
                self.coordinator.record_measures(student.name, student.last_measures)
        return events

    def _step(self, step: int, restore_step: int) -> list[dict[str, Any]]:
        """One step of every student (simultaneous or sequential); returns the non-finite recoveries it needed."""
        events, accepted = [], []
        for student in self.students:
            try:
                self.coordinator.submit(student.forward_step(step))
                accepted.append(student)
            except FrameRejected as rejected:
                if rejected.reason != NON_FINITE:
                    raise
                events.append(student.recover_from_non_finite(self.checkpoints, restore_step, step, str(rejected)))
        by_name = {student.name: student for student in accepted}
        replies = self.coordinator.compute()
        while replies:  # simultaneous: all at once; sequential: one student per turn, refreshed before the next
            for name, reply in replies.items():
                by_name[name].apply(reply.grad)
                if reply.refresh:
                    self.coordinator.refresh(by_name[name].refreshed_frame())
            replies = self.coordinator.compute() if self.coordinator.is_complete() else {}
        return events

    def evaluate(self, epoch: int) -> EpochEvaluation:
        evaluation = None
        for student in self.students:
            student.end_epoch()
            evaluation = self.coordinator.submit_eval(student.evaluate(epoch)) or evaluation
        if evaluation is None:
            raise RuntimeError(f"epoch {epoch} was not scored: the coordinator still waits for an evaluation")
        return evaluation

    def pop_records(self, before_step: int) -> list[StepRecord]:
        return self.coordinator.pop_records(before_step)

    def save_checkpoint(self, step: int) -> None:
        for student in self.students:
            self.checkpoints.save_student(step, student.name, student.state_dict())

    def pop_events(self) -> list[dict[str, Any]]:
        return []  # one process: a failure outside a chunk ends the run

    def restore(self, step: int | None) -> None:
        if step is None:  # a failure before the step-0 checkpoint was complete: nothing has trained yet
            return
        for student in self.students:
            student.restore_from(self.checkpoints, step, step // self.steps_per_epoch)
        self.coordinator.restore(step)

    def live_members(self) -> list[str]:
        return [student.name for student in self.students]


def run_local(session: RunSession, show_progress: bool = True, observers: Sequence[RunObserver] = ()) -> RunDirectory:
    """Train an opened run in this process (serving its metrics meanwhile); returns its run directory."""
    cohort = LocalCohort(session.config, session.checkpoints)
    monitoring = session.config.monitoring
    server = serve(cohort.registry, monitoring.host, monitoring.port) if monitoring.enabled else None
    file_sd = FileSdEntry(monitoring.file_sd, session.config.name) if server is not None and monitoring.file_sd else None
    try:
        if server is not None:
            address = metrics_address(monitoring.host, server, monitoring.host)
            logger.info(f"metrics at http://{address}/metrics")
            if file_sd is not None:
                file_sd.point_at(address)
        return train_loop(session.config, cohort, session.run, session.checkpoints, session.start, show_progress, observers)
    finally:
        if file_sd is not None:
            file_sd.remove()
        if server is not None:
            server.shutdown()
            server.server_close()


def train_local(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True) -> RunDirectory:
    """Train ``config``'s cohort in this process, whatever its ``runtime.engine`` says (the reference trainer)."""
    with new_session(config, run_dir, engine="local") as session:
        run = run_local(session, show_progress)
        run.finish()  # the readable table, written while the lease is held
        return run
