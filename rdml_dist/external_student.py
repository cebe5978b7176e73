"""One student as a plain process outside Ray, joined to a running cohort over gRPC (``rdml-dist student``).

It trains exactly like a Ray student (same :class:`Student`, same batch plan, same schedule),
and follows the cohort through failures by itself:

- it keeps its own snapshots, in memory, at the cohort's checkpoint points (step 0, every
  ``runtime.checkpoint.every_steps`` and every epoch end), since the run's storage may not be
  reachable from where it runs;
- when the cohort rolls back (the stream ends with ABORTED) or the coordinator restarts (the
  connection drops), it waits until the cohort trains again, joins again with its session, and
  restores its snapshot of the step the cohort went back to;
- a frame refused for NaN/inf sends it back to its latest snapshot, as a Ray student would.
"""

import time
import uuid
from dataclasses import dataclass

import grpc
import torch

from rdml_dist.run_records.checkpoints import CheckpointStore, checkpoint_directory
from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.loop import next_boundary
from rdml_dist.errors import ClusterError, ConfigError
from rdml_dist.logs import logger
from rdml_dist.messages import NON_FINITE, NOT_LIVE, WRONG_STEP
from rdml_dist.rpc.channel import describe, rejection_reason, status_code
from rdml_dist.rpc.client import CohortClient, ExchangeStream
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2
from rdml_dist.run_records.storage import Storage
from rdml_dist.students.student import Student

RETRY_SECONDS = 0.5
FOLLOWED = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass
class ExternalResult:
    """What an external student did: its last step, evaluations sent and the faults it followed."""

    student: str
    steps: int
    evaluations: int
    rejoins: int
    recoveries: int


def student_index(config: ExperimentConfig, name: str) -> int:
    """The config position of the external student ``name``; a clear error for any other name."""
    names = config.student_names()
    if name not in names:
        raise ConfigError("--name", f"{name!r} is not a student of this config (students: {', '.join(names)})")
    index = names.index(name)
    if not config.students[index].external:
        raise ConfigError(f"students.{index}.external", f"student {name!r} runs as a Ray actor; mark it external: true to run it here")
    return index


class ExternalStudent:
    """Drives one :class:`Student` through the cohort service."""

    def __init__(self, config: ExperimentConfig, name: str, client: CohortClient) -> None:
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        self.config = config
        self.client = client
        self.student = Student(config, student_index(config, name))
        self.snapshots = CheckpointStore(Storage(f"memory://rdml-external-{uuid.uuid4().hex}"))
        self.snapshot_steps: list[int] = []
        self.session = ""
        self.step = 0  # the next step this student trains
        self.result = ExternalResult(name, 0, 0, 0, 0)

    @property
    def name(self) -> str:
        return self.student.name

    def run(self) -> ExternalResult:
        """Join, train to the run's last step, leave (also when it stops early, so its peers stop waiting)."""
        self.step = self._join(first=True)
        total = self.config.training.epochs * self.student.steps_per_epoch
        try:
            while self.step < total:
                stream = self.client.stream(self.session)
                try:
                    self._train(stream, total)
                except grpc.RpcError as error:
                    self._follow(error)
                finally:
                    stream.close()
        finally:
            self._leave("finished" if self.step >= total else "stopped")
        self.result.steps = self.step
        return self.result

    def _leave(self, reason: str) -> None:
        try:
            self.client.leave(self.name, self.session, reason)
        except grpc.RpcError:
            pass  # the coordinator is gone (the run is over) or never knew this session

    def _train(self, stream: ExchangeStream, total: int) -> None:
        """Steps from ``self.step`` on, one frame and one gradient each."""
        while self.step < total:
            frame = self.student.forward_step(self.step)
            sent = time.perf_counter()
            try:
                reply = stream.exchange(frame)
            except grpc.RpcError:
                self.student.discard_pending()
                raise
            self.student.apply(reply.grad, time.perf_counter() - sent)
            self._step_done()

    def _step_done(self) -> None:
        """Move past ``self.step``: at an epoch end send the evaluation, at a cohort checkpoint point keep a snapshot."""
        self.step += 1
        spe = self.student.steps_per_epoch
        if self.step % spe == 0:
            self.student.end_epoch()
            self.client.submit_evaluation(self.student.evaluate(self.step // spe - 1), self.session)
            self.result.evaluations += 1
        if next_boundary(self.step - 1, spe, self.config.runtime.checkpoint.every_steps) == self.step:
            self._snapshot(self.step)

    def _follow(self, error: grpc.RpcError) -> None:
        """Answer a refused frame or a lost stream, leaving ``self.step`` where the cohort continues."""
        code = status_code(error)
        if code == grpc.StatusCode.INVALID_ARGUMENT and rejection_reason(error) == NON_FINITE:
            restore = max(kept for kept in self.snapshot_steps if kept <= self.step)
            self.student.recover_from_non_finite(self.snapshots, restore, self.step, error.details() or NON_FINITE)
            self.result.recoveries += 1
            self._step_done()  # the cohort finished this step without the refused frame
            return
        if code in FOLLOWED or rejection_reason(error) in (WRONG_STEP, NOT_LIVE):
            self.result.rejoins += 1
            self.step = self._join(first=False)
            return
        raise ClusterError(f"student {self.name!r}: the coordinator refused it: {describe(error)}")

    def _join(self, first: bool) -> int:
        """(Re)join once the cohort trains; returns the cohort's step, this student restored or caught up to it."""
        deadline = time.monotonic() + self.config.rpc.join_timeout_s
        while True:
            try:
                if first or self.client.status(timeout_s=5).phase != cohort_pb2.COHORT_PHASE_HALTED:
                    joined = self.client.join(self.student.info(), self.session)
                    break
            except grpc.RpcError as error:
                if status_code(error) not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ClusterError(f"student {self.name!r} cannot join the cohort at {self.client.address}: "
                                       f"{describe(error)}") from None
            if time.monotonic() > deadline:
                raise ClusterError(f"student {self.name!r}: no cohort to join at {self.client.address} within "
                                   f"{self.config.rpc.join_timeout_s:.0f} s (rpc.join_timeout_s)")
            time.sleep(RETRY_SECONDS)
        self.session = joined.session_id
        if joined.data_fingerprint != self.student.info().data_fingerprint:
            raise ClusterError(f"student {self.name!r} loaded other data than the cohort (fingerprint "
                               f"{self.student.info().data_fingerprint} vs {joined.data_fingerprint})")
        if (joined.epochs, joined.steps_per_epoch) != (self.config.training.epochs, self.student.steps_per_epoch):
            raise ClusterError(f"student {self.name!r}: the cohort trains {joined.epochs} epochs of {joined.steps_per_epoch} "
                               f"steps, this config {self.config.training.epochs} of {self.student.steps_per_epoch}")
        step = int(joined.step)
        if step in self.snapshot_steps:
            self.student.restore_from(self.snapshots, step, step // self.student.steps_per_epoch)
        elif first and step == 0:
            self._snapshot(0)
        else:
            position = "its initial weights" if first else f"its weights of step {self.step}"
            logger.warning(f"student {self.name} has no snapshot of step {step}: it continues there from {position}")
            self.student.advance_to_epoch(step // self.student.steps_per_epoch)
            self._snapshot(step)
        return step

    def _snapshot(self, step: int) -> None:
        """Keep this student's state at a cohort checkpoint point (one more than the cohort keeps)."""
        self.snapshots.save_student(step, self.name, self.student.state_dict())
        self.snapshot_steps = [kept for kept in self.snapshot_steps if kept != step] + [step]
        while len(self.snapshot_steps) > self.config.runtime.checkpoint.keep + 1:
            self.snapshots.storage.delete(checkpoint_directory(self.snapshot_steps.pop(0)))


def run_external_student(config: ExperimentConfig, name: str, address: str, token: str | None, ca_file: str | None) -> ExternalResult:
    """Run student ``name`` of ``config`` against the coordinator at ``address`` until the run ends."""
    client = CohortClient(address, config.rpc, token, ca_file)
    try:
        return ExternalStudent(config, name, client).run()
    finally:
        client.close()
