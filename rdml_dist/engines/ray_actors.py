"""Ray adapters: the async coordinator actor over the step barrier, and the student actor over Student.

The coordinator must be async: each student's ``exchange`` call waits inside the actor until
every live student of the step has arrived, which a plain (one call at a time) actor would
deadlock on. Read-only control calls (state, records, metrics) have their own concurrency group
so that step traffic never starves them; what the driver waits for (the next step, an epoch's
scores) is awaited on the loop that resolves it. Both actors are restarted by Ray when their process
dies (``max_restarts``); a restarted actor starts fresh and the driver restores it from the
run's latest checkpoint.
"""

import os
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import ray
import torch

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.devices import resolve_device
from rdml_dist.engines.failures import CoordinatorReplaced
from rdml_dist.errors import ConfigError, FrameRejected, StudentRestarted
from rdml_dist.lane.client import ShardLanes
from rdml_dist.lane.server import FrameLaneServer, lane_host
from rdml_dist.messages import (
    NON_FINITE, EpochEvaluation, EvalFrame, LogitsFrame, MimicryReply, StepRecord, StepMeasures, StudentInfo,
)
from rdml_dist.metrics import metrics_address, serve
from rdml_dist.rpc.server import CohortServer, start_cohort_server
from rdml_dist.coordinator_core.shards import join_replies, split_frame
from rdml_dist.run_records.storage import Storage
from rdml_dist.students.student import Student

CONTROL_GROUP = "control"
STORAGE_MARKER = ".storage-marker"


class Coordinator:
    """The coordinator actor: Ray methods over the shared :class:`CohortBarrier`, plus its servers.

    Every method that resolves a step's future (exchange, membership, abort, restore) runs on the
    default group's event loop, and so does the gRPC cohort service started by :meth:`serve_rpc`:
    Ray students and external students meet at one barrier; each step's computation runs on the
    barrier's worker thread, so the loop stays free meanwhile. It also serves the cohort's
    Prometheus metrics, each scrape taken under the metrics' own lock. The driver waits on futures
    here (the next step, an epoch's scores, the members), never by polling.

    Each process has its own ``incarnation``: the driver's control calls carry the one it restored,
    so a process Ray restarted meanwhile refuses them (:class:`CoordinatorReplaced`) instead of
    answering from an empty core.
    """

    def __init__(self, config: dict[str, Any], shard: int = 0) -> None:
        self.config = ExperimentConfig.model_validate(config)
        self.barrier = CohortBarrier(self.config, shard, self.config.runtime.coordinator.shards)
        if _restarted():  # refuse frames and joins until the driver has restored the cohort
            self.barrier.halted = "the coordinator restarted; the driver is restoring the cohort"
        self.incarnation = uuid.uuid4().hex
        self.driver_state = "starting"
        self._metrics_address: str | None = None
        self._recoveries: list[dict[str, Any]] = []  # students' non-finite recoveries, until the driver takes them
        self._rpc: CohortServer | None = None
        self._lane: FrameLaneServer | None = None

    async def register(self, info: StudentInfo) -> None:
        self.barrier.register(info)

    async def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Submit one student's logits and wait for its mimicry gradient (the per-step barrier)."""
        return await self.barrier.exchange(frame)

    async def refresh(self, frame: LogitsFrame) -> None:
        """Sequential update: a student's logits after its update; releases the next student's turn."""
        self.barrier.refresh(frame)

    async def record_measures(self, student: str, measures: StepMeasures | None) -> None:
        self.barrier.record_measures(student, measures)

    async def note_recovery(self, event: dict[str, Any]) -> None:
        """A student went back to its checkpoint after a non-finite step: held here, so the event outlives a chunk
        that is then aborted and the student's own process."""
        self._recoveries.append(event)

    async def pop_recoveries(self) -> list[dict[str, Any]]:
        recoveries, self._recoveries = self._recoveries, []
        return recoveries

    async def pop_dropped(self) -> list[dict[str, Any]]:
        """The silent external students the barrier dropped under ``continue``, for the driver to count."""
        return self.barrier.pop_dropped()

    def _check(self, incarnation: str | None) -> None:
        """Refuse a control call meant for another process of this actor (Ray restarted it since)."""
        if incarnation is not None and incarnation != self.incarnation:
            raise CoordinatorReplaced(f"the coordinator was restarted (pid {os.getpid()}) and lost the cohort's state")

    async def submit_eval(self, frame: EvalFrame, incarnation: str | None = None) -> None:
        self._check(incarnation)
        self.barrier.submit_eval(frame)

    async def mark_dead(self, name: str, incarnation: str | None = None) -> None:
        self._check(incarnation)
        self.barrier.mark_dead(name)

    async def abort(self, reason: str) -> None:
        self.barrier.abort(reason)

    async def restore(self, step: int, infos: list[StudentInfo]) -> str:
        """Go back to the checkpoint of ``step`` with these members; returns this process's incarnation, which the
        driver's later control calls carry."""
        self.barrier.restore(step, infos)
        return self.incarnation

    async def revive(self, info: StudentInfo, incarnation: str | None = None) -> None:
        """A restarted student rejoins the live members (``continue`` policy)."""
        self._check(incarnation)
        self.barrier.register(info)

    async def step_after(self, step: int, incarnation: str | None = None, at_least_s: float = 0.0,
                         until: int | None = None) -> int:
        """The cohort's step once it has moved past ``step`` and ``at_least_s`` have passed or it reached ``until``
        (or the step stopped: a halt, a restore)."""
        self._check(incarnation)
        return await self.barrier.step_after(step, at_least_s, until)

    async def evaluation(self, epoch: int, timeout_s: float, incarnation: str | None = None) -> EpochEvaluation:
        """Wait until every live student has evaluated ``epoch`` and return the scores (on the loop that scores it)."""
        self._check(incarnation)
        return await self.barrier.evaluation(epoch, timeout_s)

    async def wait_for_members(self, timeout_s: float) -> list[str]:
        """Wait until every member has registered; returns those still missing after ``timeout_s``."""
        return await self.barrier.wait_for_members(timeout_s)

    async def set_driver_state(self, state: str) -> None:
        """The driver's state, for ``rdml-dist status`` and the ``rdml_driver_state`` metric."""
        self.driver_state = state
        self.barrier.set_driver_state(state)

    async def student_restarted(self, name: str) -> None:
        self.barrier.student_restarted(name)

    async def serve_rpc(self, token: str | None) -> str | None:
        """Start the gRPC cohort service (once per process) when ``rpc.enabled``; returns ``host:port`` or None."""
        if self.config.rpc.enabled and self._rpc is None:
            self._rpc = await start_cohort_server(self.barrier, token, ray.util.get_node_ip_address())
        return self._rpc.address if self._rpc is not None else None

    async def serve_lane(self, secret: str) -> str:
        """Start the frame lane (once per process) where :func:`lane_host` says; returns ``host:port``."""
        if self._lane is None:
            self._lane = FrameLaneServer(self.barrier, secret, self.config.rpc.max_message_mb << 20)
            await self._lane.start(lane_host(ray.util.get_node_ip_address(), self.config.runtime.exchange.allow_plaintext))
        return self._lane.address

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def serve_metrics(self) -> str | None:
        """Start serving ``/metrics`` (once per process) as ``monitoring`` says; returns ``host:port`` or None."""
        monitoring = self.config.monitoring
        if monitoring.enabled and self._metrics_address is None:
            server = serve(self.barrier.registry, monitoring.host, monitoring.port)
            self._metrics_address = metrics_address(monitoring.host, server, ray.util.get_node_ip_address())
        return self._metrics_address

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def pop_records(self, before_step: int, incarnation: str | None = None) -> list[StepRecord]:
        self._check(incarnation)
        return self.barrier.pop_records(before_step)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def state(self) -> dict[str, Any]:
        with self.barrier.lock:
            state = self.barrier.core.state()
        return {**state, "unregistered": self.barrier.unregistered(), "steps_per_epoch": self.barrier.steps_per_epoch(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "incarnation": self.incarnation,
                "driver_state": self.driver_state}


def _restarted() -> bool:
    """Whether Ray restarted this actor (Ray 2.60's property reads a deprecated id internally: its warning is noise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


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
        self.name = self.config.students[index].name
        self._restarted = _restarted()  # cleared by restore()
        self._lane: ShardLanes | None = None
        self.index = index
        self._startup_error: ConfigError | None = None
        try:
            self.student = self._new_student()
        except ConfigError as error:  # a user's mistake: kept for the driver as itself, not a dead actor's traceback
            self._startup_error = error
        except Exception as error:  # noqa: BLE001 - a model factory or data set that fails is the user's to fix
            self._startup_error = ConfigError(
                f"students.{index}", f"student {self.name!r} could not be built: {type(error).__name__}: {error}")

    def _new_student(self) -> Student:
        return Student(self.config, self.index, resolve_device(self.config.runtime.device))

    def info(self) -> StudentInfo:
        """Registration data for the coordinator (where the actor runs is :meth:`placement`)."""
        if self._startup_error is not None:
            raise self._startup_error
        return self.student.info()

    def placement(self) -> dict[str, Any]:
        """Node, resources held, GPU ids, CUDA_VISIBLE_DEVICES, torch device, process id and compile time, for placement
        checks, fault reports and ``placements.json``."""
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "resources": {name.split("_group_")[0]: amount for name, amount in context.get_assigned_resources().items()},
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.student.device),
            "pid": os.getpid(),
            "compile_seconds": round(self.student.compute.compile_seconds, 3),  # torch.compile at start, not in any step
        }

    def run_steps(
        self, start: int, end: int, coordinators: list["ray.actor.ActorHandle"], restore_step: int,
        lane: tuple[list[str], str] | None = None,
    ) -> None:
        """Train steps ``[start, end)`` in lock-step with the cohort; each non-finite recovery is told to the first
        coordinator at once (the driver collects them there).

        ``coordinators``: every coordinator shard, the first holding the cohort's records. ``lane``
        (their addresses, this student's own lane key): exchange over their frame lanes; None: actor calls.
        """
        self._refuse_if_not_restored()
        exchange, refresh = self._transport(coordinators, lane)
        for step in range(start, end):
            frame = self.student.forward_step(step)
            sent = time.perf_counter()
            try:
                reply = exchange(frame)
            except (ray.exceptions.RayTaskError, FrameRejected) as error:
                rejection = _rejection(error)
                if rejection is None or rejection.reason != NON_FINITE:
                    raise
                event = self.student.recover_from_non_finite(self.checkpoints, restore_step, step, str(rejection))
                ray.get(coordinators[0].note_recovery.remote(event))
                continue
            self.student.apply(reply.grad, time.perf_counter() - sent)
            if reply.refresh:  # sequential update: later peers read this student's updated logits
                refresh(self.student.refreshed_frame())
        ray.get(coordinators[0].record_measures.remote(self.student.name, self.student.last_measures))

    def _transport(
        self, coordinators: list["ray.actor.ActorHandle"], lane: tuple[list[str], str] | None
    ) -> tuple[Callable[[LogitsFrame], MimicryReply], Callable[[LogitsFrame], None]]:
        """The exchange and refresh calls of this chunk: the frame lanes (connected again when a coordinator
        moved or a connection broke) or actor calls, each split by rows over the coordinator shards."""
        if lane is None:
            def ask(method: str, frame: LogitsFrame) -> list[Any]:
                parts = split_frame(frame, len(coordinators))
                return ray.get([getattr(shard, method).remote(part) for shard, part in zip(coordinators, parts)])

            def refresh(frame: LogitsFrame) -> None:
                ask("refresh", frame)

            return (lambda frame: join_replies(ask("exchange", frame))), refresh
        addresses, key = lane
        if self._lane is None or self._lane.addresses != addresses or self._lane.broken:
            if self._lane is not None:
                self._lane.close()
            self._lane = ShardLanes(addresses, key, self.student.name, self.config.runtime.ray.exchange_timeout_s,
                                    self.config.rpc.max_message_mb << 20)
        return self._lane.exchange, self._lane.refresh

    def evaluate(self, epoch: int, coordinator: "ray.actor.ActorHandle", incarnation: str | None = None) -> None:
        """Close the epoch (learning-rate schedule) and send the validation logits to the coordinator process the
        driver restored (``incarnation``)."""
        self._refuse_if_not_restored()
        self.student.end_epoch()
        ray.get(coordinator.submit_eval.remote(self.student.evaluate(epoch), incarnation))

    def save_checkpoint(self, step: int) -> str:
        """Write this student's state for ``step`` straight into the run's storage; returns where."""
        self._refuse_if_not_restored()
        return self.checkpoints.save_student(step, self.student.name, self.student.state_dict())

    def restore(self, step: int | None, cohort_epoch: int) -> StudentInfo:
        """Load this student's file of the checkpoint at ``step`` (None: start again from the initial weights, after
        a failure before the step-0 checkpoint was complete); returns its registration data."""
        if step is None:
            self.student = self._new_student()
        else:
            self.student.restore_from(self.checkpoints, step, cohort_epoch)
        self._restarted = False
        return self.student.info()

    def _refuse_if_not_restored(self) -> None:
        if self._restarted:
            raise StudentRestarted(f"student {self.name!r} was restarted (pid {os.getpid()}) and not yet restored")

    def state_dict(self) -> dict[str, Any]:
        """The student's full state, as CPU tensors whatever device it trains on."""
        return self.student.state_dict()
