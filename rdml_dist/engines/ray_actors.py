"""Ray adapters: the async coordinator actor over the coordinator core, and the student actor over Student.

The coordinator must be async: each student's ``exchange`` call waits inside the actor until
every live student of the step has arrived, which a plain (one call at a time) actor would
deadlock on. Read-only control calls (state, records, scores) have their own concurrency group
so that step traffic never starves them; everything that resolves a step's future (exchange,
membership, abort, restore) runs on the default group's event loop, the loop that owns those futures. Both actors are restarted by Ray when their process dies
(``max_restarts``); a restarted actor starts fresh and the driver restores it from the run's
latest checkpoint.
"""

import asyncio
import os
import threading
import time
from typing import Any

import ray
import torch

from rdml_dist.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator import NON_FINITE, EpochEvaluation, StepRecord
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.frames import EvalFrame, LogitsFrame, MimicryReply, StepTiming, StudentInfo
from rdml_dist.metered_coordinator import MeteredCoordinator
from rdml_dist.metrics import CohortMetrics, LockedRegistry, metrics_address, serve
from rdml_dist.storage import Storage
from rdml_dist.student import Student, resolve_device

CONTROL_GROUP = "control"
STORAGE_MARKER = ".storage-marker"


class Coordinator:
    """Async barrier around the coordinator core: one batched computation answers all students.

    Ray runs each concurrency group on its own event-loop thread, so every touch of the core
    happens under one lock (short, synchronous sections; never held across an ``await``).
    A failed computation, or an abort while the cohort rolls back, fails the step for every
    waiting student at once. It also serves the cohort's Prometheus metrics, each scrape taken
    under the same lock.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ExperimentConfig.model_validate(config)
        self.lock = threading.Lock()
        self.registry = LockedRegistry(self.lock)
        self.core = MeteredCoordinator(self.config, CohortMetrics.for_config(self.config, self.registry))
        self._metrics_address: str | None = None
        self._step_results: dict[int, asyncio.Future[dict[str, MimicryReply]]] = {}
        self._halted: str | None = None

    def _step_future(self, step: int) -> "asyncio.Future[dict[str, MimicryReply]]":
        return self._step_results.setdefault(step, asyncio.get_running_loop().create_future())

    def _compute(self) -> dict[str, MimicryReply]:
        return self.core.compute()

    def _complete_if_ready(self) -> None:
        """Run the batched computation once the last live student of the step has arrived."""
        if self._halted is None and self.core.is_complete():
            step = self.core.step
            future = self._step_future(step)
            try:
                replies = self._compute()
            except Exception as error:  # noqa: BLE001 - any failure must reach every waiting student
                self._halt(f"step {step}: the coordinator's computation failed: {type(error).__name__}: {error}")
                return
            future.set_result(replies)
            self._step_results.pop(step - 1, None)

    def _halt(self, reason: str) -> None:
        """Refuse further frames and fail every waiting student now, until the driver restores the cohort."""
        self._halted = reason
        for future in self._step_results.values():
            if not future.done():
                future.set_exception(CohortStepFailed(reason))

    async def register(self, info: StudentInfo) -> None:
        with self.lock:
            self.core.register(info)

    async def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Submit one student's logits and wait for its mimicry gradient (the per-step barrier)."""
        with self.lock:
            if self._halted is not None:
                raise CohortStepFailed(self._halted)
            try:
                self.core.submit(frame)
                future = self._step_future(frame.step)
            finally:
                self._complete_if_ready()
        replies = await asyncio.wait_for(asyncio.shield(future), timeout=self.config.runtime.ray.exchange_timeout_s)
        return replies[frame.student]

    async def record_timing(self, student: str, timing: StepTiming | None) -> None:
        """A student's measurement of the last step of a chunk (no next frame carries it)."""
        with self.lock:
            self.core.record_timing(student, timing)

    async def submit_eval(self, frame: EvalFrame) -> None:
        with self.lock:
            self.core.submit_eval(frame)

    async def mark_dead(self, name: str) -> None:
        """Stop waiting for ``name``; a step that only waited for it completes now."""
        with self.lock:
            self.core.mark_dead(name)
            self._complete_if_ready()

    async def abort(self, reason: str) -> None:
        """Fail the current step for everyone (the driver is about to roll the cohort back)."""
        with self.lock:
            self._halt(reason)

    async def restore(self, step: int, infos: list[StudentInfo]) -> None:
        """Start again at a checkpoint's ``step`` with these members (after a rollback or this actor's restart)."""
        with self.lock:
            for info in infos:
                self.core.register(info)
            self.core.restore(step)
            self._halt("the cohort was restored to a checkpoint")
            self._step_results.clear()
            self._halted = None

    async def revive(self, info: StudentInfo) -> None:
        """A restarted student rejoins the live members (``continue`` policy)."""
        with self.lock:
            self.core.register(info)

    async def student_restarted(self, name: str) -> None:
        """Count a student's restart (its liveness shows 0 until the cohort is restored)."""
        with self.lock:
            self.core.student_restarted(name)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def serve_metrics(self) -> str | None:
        """Start serving ``/metrics`` (once per process) as ``monitoring`` says; returns ``host:port`` or None."""
        monitoring = self.config.monitoring
        if monitoring.enabled and self._metrics_address is None:
            server = serve(self.registry, monitoring.host, monitoring.port)
            self._metrics_address = metrics_address(monitoring.host, server, ray.util.get_node_ip_address())
        return self._metrics_address

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def evaluation(self, epoch: int, timeout_s: float) -> EpochEvaluation:
        """Wait until every live student has evaluated ``epoch`` and return the scores."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if epoch in self.core.evaluations:
                    return self.core.evaluations[epoch]
            if time.monotonic() > deadline:
                raise TimeoutError(f"epoch {epoch} was not scored within {timeout_s} s")
            await asyncio.sleep(0.01)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def pop_records(self, before_step: int) -> list[StepRecord]:
        with self.lock:
            return self.core.pop_records(before_step)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def state(self) -> dict[str, Any]:
        with self.lock:
            return {**self.core.state(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


CoordinatorActor = ray.remote(num_cpus=0, concurrency_groups={CONTROL_GROUP: 4})(Coordinator)


def _rejection(error: BaseException) -> FrameRejected | None:
    """The coordinator's refusal of a frame, unwrapped from Ray's task error."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return cause if isinstance(cause, FrameRejected) else None


@ray.remote
class StudentActor:
    """One student in its own process: loads its data, trains, exchanges logits, writes its own checkpoints."""

    def __init__(self, config: dict[str, Any], index: int, torch_threads: int, run_location: str, marker: str) -> None:
        torch.set_num_threads(torch_threads)
        self.config = ExperimentConfig.model_validate(config)
        storage = Storage(run_location)
        if not storage.exists(STORAGE_MARKER) or storage.read_bytes(STORAGE_MARKER).decode() != marker:
            raise RuntimeError(
                f"the run directory {storage.describe()} is not visible from node "
                f"{ray.get_runtime_context().get_node_id()}: runtime.storage must be a shared file system or a URI "
                "that every node of the cluster can reach"
            )
        self.checkpoints = CheckpointStore(storage)
        self.student = Student(self.config, index, resolve_device(self.config.runtime.device))

    def info(self) -> StudentInfo:
        """Registration data for the coordinator (where the actor runs is :meth:`placement`)."""
        return self.student.info()

    def placement(self) -> dict[str, Any]:
        """Node, GPU ids, CUDA_VISIBLE_DEVICES, torch device and process id, for placement checks and fault reports."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.student.device),
            "pid": os.getpid(),
        }

    def run_steps(self, start: int, end: int, coordinator: "ray.actor.ActorHandle", restore_step: int) -> list[dict[str, Any]]:
        """Train steps ``[start, end)`` in lock-step with the cohort; returns non-finite recoveries."""
        events = []
        for step in range(start, end):
            frame = self.student.forward_step(step)
            sent = time.perf_counter()
            try:
                reply = ray.get(coordinator.exchange.remote(frame))
            except ray.exceptions.RayTaskError as error:
                rejection = _rejection(error)
                if rejection is None or rejection.reason != NON_FINITE:
                    raise
                events.append(self.student.recover_from_non_finite(self.checkpoints, restore_step, step, str(rejection)))
                continue
            self.student.apply(reply.grad, time.perf_counter() - sent)
        ray.get(coordinator.record_timing.remote(self.student.name, self.student.last_timing))
        return events

    def evaluate(self, epoch: int, coordinator: "ray.actor.ActorHandle") -> None:
        """Close the epoch (learning-rate schedule) and send the validation logits to the coordinator."""
        self.student.end_epoch()
        ray.get(coordinator.submit_eval.remote(self.student.evaluate(epoch)))

    def save_checkpoint(self, step: int) -> str:
        """Write this student's state for ``step`` straight into the run's storage; returns where."""
        return self.checkpoints.save_student(step, self.student.name, self.student.state_dict())

    def restore(self, step: int, cohort_epoch: int) -> StudentInfo:
        """Load this student's file of the checkpoint at ``step``; returns its registration data."""
        self.student.restore_from(self.checkpoints, step, cohort_epoch)
        return self.student.info()

    def state_dict(self) -> dict[str, Any]:
        """The student's full state, as CPU tensors whatever device it trains on."""
        return self.student.state_dict()
