"""The Ray engine's cohort: gang-scheduled actors, and the driver's side of surviving their failures.

Images never pass through the driver, and neither do weights: each student actor loads its own
data and writes its own checkpoints to the run's storage. The driver starts chunks of steps,
polls the actors, hands every failure to the :class:`FailurePolicy` and carries out its decision.
"""

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rdml_dist.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig, StudentConfig
from rdml_dist.engines.failure_policy import Decision, Failure, FailurePolicy
from rdml_dist.engines.loop import CohortRollback, RunObserver, train_loop
from rdml_dist.engines.ray_actors import STORAGE_MARKER, CoordinatorActor, StudentActor
from rdml_dist.engines.ray_cluster import connect
from rdml_dist.engines.session import RunSession, new_session
from rdml_dist.errors import ClusterError, CohortStepFailed, ConfigError, CoordinatorUnreachable, StudentRestarted
from rdml_dist.messages import EpochEvaluation, StepRecord, StudentInfo
from rdml_dist.metrics import FileSdEntry
from rdml_dist.rpc.auth import check_bind, resolve_token
from rdml_dist.run_directory import RunDirectory
from rdml_dist.shards import merge_records
from rdml_dist.storage import Storage

POLL_SECONDS = 0.25
RESTART_TIMEOUT_S = 120.0
HEAD_NODE_RESOURCE = "node:__internal_head__"


class CohortDoesNotFit(ClusterError):
    """The cluster cannot hold the cohort's placement group within the timeout."""


@dataclass(frozen=True)
class GivenPlacement:
    """A placement group reserved by someone else (a Ray Tune trial), in which the cohort's bundles start at
    ``first_bundle``: coordinator shards first, then one bundle per Ray student. The cohort uses it as it
    is and never removes it; its owner does."""

    group: PlacementGroup
    first_bundle: int


def cohort_bundles(config: ExperimentConfig, bundles: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    """The cohort's bundles in placement order: one per coordinator shard, then one per Ray student."""
    shards = config.runtime.coordinator.shards
    return [*(coordinator_resources(config) for _ in range(shards)), *(dict(bundle) for bundle in bundles.values())]


def student_cpus(config: ExperimentConfig, student: StudentConfig) -> float:
    """A Ray student's CPUs: its own ``resources.cpus``, else ``runtime.ray.cpus_per_student``."""
    return config.runtime.ray.cpus_per_student if student.resources.cpus is None else student.resources.cpus


def student_resources(config: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Each Ray student's bundle: its own ``resources`` where set, else ``runtime.ray``'s defaults.

    By default a student gets a whole GPU when the cluster has GPUs; fractions let small students
    share one while a large student gets a GPU of its own.
    """
    settings = config.runtime.ray
    default_gpus = settings.gpus_per_student
    if default_gpus is None:
        default_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and config.runtime.device != "cpu" else 0.0
    bundles = {}
    for name, student in zip(config.student_names(), config.students):
        if student.external:
            continue
        own = student.resources
        gpus = default_gpus if own.gpus is None else own.gpus
        bundles[name] = {"CPU": student_cpus(config, student), **({"GPU": gpus} if gpus > 0 else {})}
    return bundles


def coordinator_resources(config: ExperimentConfig) -> dict[str, float]:
    """The coordinator's own bundle: its CPUs, optionally a GPU fraction, and optionally a place on the head node."""
    settings = config.runtime.coordinator
    bundle = {"CPU": settings.cpus, **({"GPU": settings.gpus} if settings.gpus > 0 else {})}
    if settings.on_head_node:
        bundle[HEAD_NODE_RESOURCE] = 0.001  # every head node has one unit of this resource
    return bundle


def reserve_cohort(config: ExperimentConfig, bundles: dict[str, dict[str, float]]) -> PlacementGroup:
    """Gang-schedule coordinator and students in one placement group: ready whole, or a clear failure."""
    settings = config.runtime.ray
    shards = config.runtime.coordinator.shards
    reserved = cohort_bundles(config, bundles)
    group = placement_group(reserved, strategy=settings.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=settings.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        asked = ", ".join(f"{name} {bundle}" for name, bundle in bundles.items())
        raise CohortDoesNotFit(
            f"the cluster cannot hold the cohort: {shards} coordinator shard(s) of {reserved[0]} and {len(bundles)} students ({asked}) "
            f"with strategy {settings.placement_strategy} did not fit within {settings.placement_timeout_s:.0f} s "
            f"(cluster total: {ray.cluster_resources()}, available: {ray.available_resources()}); add nodes, lower "
            "runtime.ray.cpus_per_student/gpus_per_student, students[].resources or runtime.coordinator.cpus, "
            "or relax runtime.ray.placement_strategy"
        )
    return group


def _bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)


def _cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class RayCohort:
    """The live actors of one run: a coordinator and one student actor per placement-group bundle.

    External students (``students[].external``) have no actor: they join the coordinator's gRPC
    service from their own processes, and the driver waits for them whenever the coordinator
    starts (at launch, after its restart). They keep their own snapshots and follow a rollback
    by themselves, so the driver's calls (chunks, evaluation, checkpoints) go to Ray students only.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        placement: GivenPlacement,
        bundles: dict[str, dict[str, float]],
        storage: Storage,
        record_placements: Callable[[dict[str, dict[str, Any]], dict[str, Any]], None],
        token: str | None = None,
        owns_group: bool = True,
    ) -> None:
        self.config = config
        self.record_placements = record_placements
        self.group = group = placement.group
        self.owns_group = owns_group  # a group given by a Tune trial is its owner's to remove
        first = placement.first_bundle
        self.policy = FailurePolicy(config.runtime.fault)
        self.checkpoints = CheckpointStore(storage)
        marker = uuid.uuid4().hex
        storage.write_bytes(STORAGE_MARKER, marker.encode())  # every student must see it: the storage is shared
        payload = config.model_dump(mode="json")
        restarts = -1 if config.runtime.fault.on_student_failure != "fail" else 0
        shards = config.runtime.coordinator.shards
        self.shards = [  # each serves its rows of every step; the first also holds records, evaluation, services
            CoordinatorActor.options(
                num_cpus=config.runtime.coordinator.cpus,
                num_gpus=config.runtime.coordinator.gpus,
                max_restarts=restarts,
                scheduling_strategy=_bundle(group, first + shard),
            ).remote(payload, shard)
            for shard in range(shards)
        ]
        self.coordinator = self.shards[0]
        self.token = token
        self.file_sd = FileSdEntry(config.monitoring.file_sd, config.name) if config.monitoring.file_sd else None
        self.external = config.external_students()
        self.names = [name for name in config.student_names() if name not in self.external]
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self._lane_secret = uuid.uuid4().hex  # reaches the students through Ray only: the lane's credential
        self.lane: tuple[list[str], str] | None = None  # every shard's frame-lane address, and the secret
        try:
            self.rpc_address = self._serve_rpc()  # before the students start: external ones may join meanwhile
            self.lane = self._serve_lane()
            self.actors = {
                name: StudentActor.options(
                    num_cpus=bundles[name]["CPU"],
                    num_gpus=bundles[name].get("GPU", 0),
                    max_restarts=restarts,
                    scheduling_strategy=_bundle(group, first + shards + position),
                ).remote(
                    payload,
                    config.student_names().index(name),
                    config.runtime.torch_threads or max(1, int(bundles[name]["CPU"])),
                    storage.url,
                    marker,
                )
                for position, name in enumerate(self.names)
            }
            self.infos = dict(zip(self.names, _get_with_user_errors([actor.info.remote() for actor in self.actors.values()])))
            ray.get([shard.register.remote(info) for shard in self.shards for info in self.infos.values()])
            self.metrics_address = self._serve_metrics()
            self._wait_for_external_students()
            self._update_placements()
        except BaseException:
            self.shutdown()  # a student that cannot start must not leave the cohort's actors and reservation behind
            raise
        self.steps_per_epoch = ray.get(self.coordinator.state.remote())["steps_per_epoch"]
        self.live = set(self.names)
        self.latest_checkpoint: int | None = None  # the step a student restarted under ``continue`` restores
        self._events: list[dict[str, Any]] = []  # failures met while evaluating or checkpointing, for pop_events

    def placements(self) -> dict[str, dict[str, Any]]:
        """Where each student runs (node id, GPU ids, device, pid)."""
        return dict(zip(self.names, ray.get([self.actors[name].placement.remote() for name in self.names])))

    def _serve_rpc(self) -> str | None:
        """Have the coordinator serve the gRPC cohort service (again, after a restart)."""
        return _get_with_user_errors(self.coordinator.serve_rpc.remote(self.token))

    def _serve_lane(self) -> tuple[list[str], str] | None:
        """Have every coordinator shard open its frame lane (again, after a restart) when the students exchange over TCP."""
        if self.config.runtime.exchange.transport != "tcp":
            return None
        return ray.get([shard.serve_lane.remote(self._lane_secret) for shard in self.shards]), self._lane_secret

    def _wait_for_external_students(self) -> None:
        """Block until every external student has joined the coordinator, or fail naming the missing ones."""
        if not self.external:
            return
        timeout = self.config.rpc.join_timeout_s
        print(f"rdml-dist: waiting up to {timeout:.0f} s for external students {', '.join(self.external)} at "
              f"{self.rpc_address} (rdml-dist student CONFIG --coordinator {self.rpc_address} --name NAME)", flush=True)
        deadline = time.monotonic() + timeout
        while True:
            missing = [name for name in ray.get(self.coordinator.state.remote())["unregistered"] if name in self.external]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"external student(s) {', '.join(missing)} did not join the cohort service at {self.rpc_address} "
                    f"within {timeout:.0f} s (rpc.join_timeout_s); start each with: rdml-dist student CONFIG "
                    f"--coordinator {self.rpc_address} --name NAME"
                )
            time.sleep(POLL_SECONDS)

    def _serve_metrics(self) -> str | None:
        """Have the coordinator serve its metrics (again, after a restart); keep Prometheus's file_sd current."""
        address = _get_with_user_errors(self.coordinator.serve_metrics.remote())
        if address is not None and self.file_sd is not None:
            self.file_sd.point_at(address)
        return address

    def _update_placements(self) -> None:
        """Learn (again, after restarts) where every student and the coordinator run, and record it."""
        self.where = self.placements()
        states = ray.get([shard.state.remote() for shard in self.shards])
        lanes = self.lane[0] if self.lane else [None] * len(self.shards)
        coordinator = {"node_id": states[0]["node_id"], "pid": states[0]["pid"], "metrics": self.metrics_address,
                       "rpc": self.rpc_address, "lane": lanes[0]}
        if len(self.shards) > 1:
            coordinator["shards"] = [{"node_id": state["node_id"], "pid": state["pid"], "lane": lane} for state, lane in zip(states, lanes)]
        external = {name: {"external": True, "coordinator": self.rpc_address} for name in self.external}
        self.record_placements({**self.where, **external}, coordinator)

    def live_members(self) -> list[str]:
        return [name for name in self.names if name in self.live]

    # -- one chunk of steps, with failures handed to the policy ------------------------------
    def run_steps(self, start: int, end: int, restore_step: int, on_progress: Callable[[int], None]) -> list[dict[str, Any]]:
        self.latest_checkpoint = restore_step
        calls = {
            self.actors[name].run_steps.remote(start, end, self.shards, restore_step, self.lane): name
            for name in self.live_members()
        }
        events: list[dict[str, Any]] = []
        rejoining: list[str] = []
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            for reference in done:
                try:
                    events.extend(ray.get(reference))
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                    events.append(self._lose_student(calls[reference], error, start, pending))
                    rejoining.append(calls[reference])
            step = self._coordinator_step(start, pending)
            on_progress(step)
        if not calls:  # external students only: the chunk is over when the coordinator has computed its last step
            self._wait_for_step(start, end, on_progress)
        for name in rejoining:
            # The epoch the chunk ending at ``end`` belongs to: its end (if any) is closed by evaluate().
            self._rejoin(name, restore_step, (end - 1) // self.steps_per_epoch)
        return events

    def _wait_for_step(self, start: int, end: int, on_progress: Callable[[int], None]) -> None:
        """Follow the coordinator to ``end``; a cohort that stops advancing for the exchange timeout fails the run."""
        timeout = self.config.runtime.ray.exchange_timeout_s
        last_step, last_move = start - 1, time.monotonic()
        while (step := self._coordinator_step(start, [])) < end:
            on_progress(step)
            if step != last_step:
                last_step, last_move = step, time.monotonic()
            elif time.monotonic() - last_move > timeout:
                raise ClusterError(f"the external students made no progress at step {step} for {timeout:.0f} s "
                                   "(runtime.ray.exchange_timeout_s)")
            time.sleep(POLL_SECONDS)

    def _student_failure(self, name: str, step: int, error: BaseException) -> Failure:
        self.coordinator.student_restarted.remote(name)  # metrics only: nothing waits for it
        return Failure("student_died", step, _cause(error), student=name, node=self.where[name]["node_id"])

    def _task_failure(self, error: ray.exceptions.RayTaskError, step: int) -> Failure:
        """A student's call raised: the coordinator died under it, its computation failed, or a real bug (re-raised).

        A student's own death surfaces as a bare actor error or :class:`StudentRestarted`, never here.
        """
        if isinstance(error.cause, CohortStepFailed):
            return Failure("coordinator_error", step, str(error.cause))
        if isinstance(error.cause, ray.exceptions.RayActorError):
            return Failure("coordinator_died", step, _cause(error.cause))
        death = self._coordinator_death()
        if death is not None:  # Ray's account of the death says more than the broken call or connection
            return Failure("coordinator_died", step, _cause(death))
        if isinstance(error.cause, CoordinatorUnreachable):  # the lane broke under a coordinator Ray already restarted
            return Failure("coordinator_died", step, _cause(error.cause))
        raise error

    def _coordinator_death(self) -> BaseException | None:
        """Why a coordinator shard cannot answer (Ray's error), or None while all are alive."""
        try:
            ray.get([shard.state.remote() for shard in self.shards], timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
            return error
        return None

    def _coordinator_step(self, start: int, pending: list[ray.ObjectRef]) -> int:
        """The cohort's step for the progress bar; a coordinator that died goes to the policy."""
        return self._from_coordinators([self.coordinator.state.remote()], start, pending)[0]["step"]

    def _from_coordinators(self, references: list[ray.ObjectRef], step: int, pending: list[ray.ObjectRef] | None = None) -> list[Any]:
        """Results of calls on coordinator shards; a shard that died meanwhile is a lost coordinator, handed to the
        policy (the students' calls still ``pending`` are stopped with the rollback)."""
        try:
            return ray.get(references)
        except ray.exceptions.RayActorError as error:
            self._decide_and_roll_back(Failure("coordinator_died", step, _cause(error)), pending or [])
            raise  # unreachable: rolling back raises

    def _decide_and_roll_back(self, failure: Failure, pending: list[ray.ObjectRef]) -> None:
        """For failures no policy answers by carrying on: the policy may stop the run, else the cohort rolls back."""
        self.policy.decide(failure)
        self._roll_back(failure, pending)

    def _roll_back(self, failure: Failure, pending: list[ray.ObjectRef]) -> None:
        """Stop the chunk on every student and have the loop take the cohort back to its latest checkpoint."""
        try:
            ray.get([shard.abort.remote(failure.describe()) for shard in self.shards], timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # a dead coordinator already failed every waiting student
        ray.wait(pending, num_returns=len(pending), timeout=self.config.runtime.ray.exchange_timeout_s)
        raise CohortRollback(failure.event())

    def _wait_until_restarted(self, actor: "ray.actor.ActorHandle", what: str) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=10)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                if time.monotonic() > deadline or isinstance(error, ray.exceptions.ActorDiedError):
                    raise ClusterError(f"{what} was not restarted within {RESTART_TIMEOUT_S:.0f} s ({_cause(error)})") from None
                time.sleep(POLL_SECONDS)

    def _rejoin(self, name: str, restore_step: int, cohort_epoch: int) -> None:
        """A student restarted under ``continue`` restores its checkpoint of ``restore_step``, catches up with the
        cohort's epoch and takes part again."""
        self._wait_until_restarted(self.actors[name], f"student {name!r}")
        info = ray.get(self.actors[name].restore.remote(restore_step, cohort_epoch))
        ray.get([shard.revive.remote(info) for shard in self.shards])
        self.live.add(name)
        self._update_placements()

    # -- epoch end, checkpoints, rollback -------------------------------------------------------
    def evaluate(self, epoch: int) -> EpochEvaluation:
        end = (epoch + 1) * self.steps_per_epoch
        self._on_live_students(lambda actor: actor.evaluate.remote(epoch, self.coordinator), end, epoch)
        return self._from_coordinators([self.coordinator.evaluation.remote(epoch, self.config.runtime.ray.exchange_timeout_s)], end)[0]

    def pop_records(self, before_step: int) -> list[StepRecord]:
        return merge_records(self._from_coordinators([shard.pop_records.remote(before_step) for shard in self.shards], before_step))

    def pop_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def save_checkpoint(self, step: int) -> None:
        self._on_live_students(lambda actor: actor.save_checkpoint.remote(step), step, step // self.steps_per_epoch)

    def _on_live_students(self, call: Callable[["ray.actor.ActorHandle"], ray.ObjectRef], step: int, cohort_epoch: int) -> None:
        """Run ``call`` on every live student. One that dies meanwhile goes to the policy: under ``continue`` it is
        restarted at ``cohort_epoch`` from the latest checkpoint and called again, else the cohort rolls back."""
        calls = {call(self.actors[name]): name for name in self.live_members()}
        while calls:
            done, _ = ray.wait(list(calls), num_returns=1)
            name = calls.pop(done[0])
            try:
                ray.get(done[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
                self._events.append(self._lose_student(name, error, step, list(calls)))
                self._rejoin(name, self.latest_checkpoint, cohort_epoch)
                calls[call(self.actors[name])] = name

    def _lose_student(self, name: str, error: ray.exceptions.RayError, step: int, pending: list[ray.ObjectRef]) -> dict[str, Any]:
        """A call on student ``name`` failed. Its own death, under ``continue``: it leaves the cohort (returns the
        event) and the caller has it rejoin. Anything else goes to the policy and rolls the cohort back (raises)."""
        if not _student_died(error):
            self._decide_and_roll_back(self._task_failure(error, step), pending)
        failure = self._student_failure(name, step, error)
        if self.policy.decide(failure) is not Decision.CONTINUE or self.latest_checkpoint is None:
            self._roll_back(failure, pending)
        ray.get([shard.mark_dead.remote(name) for shard in self.shards])
        self.live.discard(name)
        return {**failure.event(), "action": "the live students went on"}

    def restore(self, step: int) -> None:
        """Every student (restarted ones included) and the coordinator go back to the checkpoint of ``step``."""
        for name, actor in self.actors.items():
            self._wait_until_restarted(actor, f"student {name!r}")
        for index, shard in enumerate(self.shards):
            self._wait_until_restarted(shard, "the coordinator" if len(self.shards) == 1 else f"coordinator shard {index}")
        self.rpc_address = self._serve_rpc()
        self.lane = self._serve_lane()
        self.metrics_address = self._serve_metrics()
        epoch = step // self.steps_per_epoch
        infos: list[StudentInfo] = ray.get([self.actors[name].restore.remote(step, epoch) for name in self.names])
        ray.get([shard.restore.remote(step, infos) for shard in self.shards])
        self._wait_for_external_students()  # a restarted coordinator knows none of them until they join again
        self.live = set(self.names)
        self.latest_checkpoint = step
        self._update_placements()

    def shutdown(self) -> None:
        if self.file_sd is not None:
            self.file_sd.remove()
        for actor in [*self.actors.values(), *self.shards]:
            ray.kill(actor, no_restart=True)
        if self.owns_group:
            remove_placement_group(self.group)


def _get_with_user_errors(references: Any) -> Any:
    """``ray.get``, with an error meant for the user raised inside an actor (a config problem met by a
    student, a port the coordinator cannot bind) re-raised as itself: one line in the CLI, not a traceback."""
    try:
        return ray.get(references)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (ConfigError, ClusterError)):
            raise error.cause from None
        raise


def _student_died(error: ray.exceptions.RayError) -> bool:
    """A student's own death: a bare actor error, or a call that reached its restarted process before the driver
    restored it (Ray hands calls made after a death to the new process)."""
    if isinstance(error, ray.exceptions.RayTaskError):  # first: Ray's wrapper may also be a RayActorError
        return isinstance(error.cause, StudentRestarted)
    return isinstance(error, ray.exceptions.RayActorError)


def run_ray(
    session: RunSession,
    show_progress: bool = True,
    observers: Sequence[RunObserver] = (),
    placement: GivenPlacement | None = None,
) -> RunDirectory:
    """Train an opened run as Ray actors on the requested cluster (or a private local Ray).

    By default the cohort reserves its own placement group; a Ray Tune trial passes the trial's
    group (``placement``) instead, since a group reserved inside a trial can hang the sweep.
    """
    config = session.config
    token = resolve_token(config.rpc)
    if config.rpc.enabled:
        check_bind(config.rpc, token)
    cpus_needed = config.runtime.coordinator.cpus * config.runtime.coordinator.shards + sum(
        student_cpus(config, student) for student in config.students if not student.external
    )
    connection = connect(config.runtime.ray.address, cpus_needed)
    print(f"rdml-dist: {connection.description}", flush=True)
    try:
        bundles = student_resources(config)
        owned = placement is None
        given = GivenPlacement(reserve_cohort(config, bundles), 0) if placement is None else placement
        cohort = RayCohort(config, given, bundles, session.storage, session.run.write_placements, token, owns_group=owned)
        if cohort.rpc_address:
            print(f"rdml-dist: cohort service (gRPC) at {cohort.rpc_address}", flush=True)
        if cohort.metrics_address:
            print(f"rdml-dist: metrics at http://{cohort.metrics_address}/metrics", flush=True)
        try:
            return train_loop(config, cohort, session.run, session.checkpoints, session.start, show_progress, observers)
        finally:
            cohort.shutdown()
    finally:
        if connection.started:
            ray.shutdown()


def train_ray(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True) -> RunDirectory:
    """Train ``config``'s cohort as Ray actors, whatever its ``runtime.engine`` says."""
    return run_ray(new_session(config, run_dir, engine="ray"), show_progress)
