"""The Ray cohort: the coordinator shards and one student actor per bundle, and the driver's calls on them.

Images never pass through the driver, and neither do weights: each student actor loads its own
data and writes its own checkpoints to the run's storage. Every call the driver makes is awaited
on its future; every error met on the way is turned into a plain cause, classified once
(:func:`~rdml_dist.engines.failures.classify`) and handed to the :class:`FailurePolicy`. Its
decision is carried out here: the live students go on (``continue``), or the chunk is stopped
and :class:`CohortRollback` tells the loop to go back to the latest checkpoint. Control calls on
a coordinator carry the incarnation the driver restored: a process Ray replaced meanwhile
refuses them, which is a coordinator failure like its death.
"""

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import ray

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.failure_policy import Decision, Failure, FailurePolicy, RunFailed
from rdml_dist.engines.failures import COORDINATOR, CoordinatorReplaced, FailureKind, ProcessDied, classify, one_line
from rdml_dist.engines.loop import CohortRollback
from rdml_dist.engines.placement import GivenPlacement, bundle_strategy
from rdml_dist.engines.ray_actors import STORAGE_MARKER, CoordinatorActor, StudentActor
from rdml_dist.errors import ClusterError, ConfigError, ExternalStudentsMissing, StudentRestarted
from rdml_dist.lane.handshake import new_run_secret, student_key
from rdml_dist.lane.server import lanes_reach
from rdml_dist.logs import logger
from rdml_dist.messages import DriverState, EpochEvaluation, StepRecord, StudentInfo
from rdml_dist.metrics import FileSdEntry
from rdml_dist.coordinator_core.shards import merge_records
from rdml_dist.run_records.storage import Storage

RESTART_TIMEOUT_S = 120.0
RESTART_POLL_S = 0.25
PROGRESS_INTERVAL_S = 0.2  # the driver hears the cohort's step at most this often: one actor call, not one per step
STALL_MARGIN_S = 60.0  # beyond the exchange timeout: a chunk in which nothing moved for that long has hung


def cause_of(error: BaseException, who: str) -> BaseException:
    """The plain cause behind a Ray error met on a call to ``who``: the task's own exception, :class:`ProcessDied`
    for a dead actor (``who``, or the coordinator when a call a student made died under it), ``TimeoutError``."""
    if isinstance(error, ray.exceptions.RayTaskError):  # first: Ray's wrapper may also be a RayActorError
        cause = error.cause
        while isinstance(cause, ray.exceptions.RayTaskError):
            cause = cause.cause
        if isinstance(cause, ray.exceptions.RayActorError):  # students call only coordinators
            return ProcessDied(COORDINATOR, one_line(cause))
        return cause if isinstance(cause, BaseException) else error
    if isinstance(error, ray.exceptions.RayActorError):
        return ProcessDied(who, one_line(error))
    if isinstance(error, ray.exceptions.GetTimeoutError):
        return TimeoutError(str(error))
    return error


class RayCohort:
    """The live actors of one run: coordinator shards and one student actor per placement-group bundle.

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
        self.group = placement.group
        self.owns_group = owns_group  # a group given by a Tune trial is its owner's to remove
        self.policy = FailurePolicy(config.runtime.fault)
        self.checkpoints = CheckpointStore(storage)
        self.token = token
        self.file_sd = FileSdEntry(config.monitoring.file_sd, config.name) if config.monitoring.file_sd else None
        self.external = config.external_students()
        self.names = [name for name in config.student_names() if name not in self.external]
        self.shards: list[ray.actor.ActorHandle] = []
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.where: dict[str, dict[str, Any]] = {}
        self._lane_secret = new_run_secret()  # the coordinator's only; each student gets its own key, through Ray
        self.lane: list[str] | None = None  # every shard's frame-lane address
        self._through_actor_calls: set[str] = set()  # students told that no frame lane reaches their node
        self._start_s = config.runtime.ray.start_timeout_s  # the bound on each call while the cohort starts (or serves again)
        self.latest_checkpoint: int | None = None  # the step a student restarted under ``continue`` restores
        self._events: list[dict[str, Any]] = []  # failures met while evaluating or checkpointing, for pop_events
        self._inflight: dict[ray.ObjectRef, str] = {}  # the students' calls under way, by student
        # how long those calls may still run after a rollback's abort before they count as hung (and are killed)
        self._patience_s = config.runtime.ray.exchange_timeout_s
        self._watches: list[ray.ObjectRef] = []  # futures of the next step not yet collected
        self._reported_deaths: set[str] = set()  # processes whose death is in an event since the placements were read
        self._coordinator_states: list[dict[str, Any]] = []  # each shard's last answer to ``state``
        try:  # whatever fails while starting must not leave the actors and the reservation behind
            self._start(placement.first_bundle, bundles, storage)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise ClusterError(f"the coordinator did not answer while the cohort started (runtime.ray.start_timeout_s: "
                               f"{self._start_s:.0f} s, and rpc.join_timeout_s while it waited for external students)") from None
        except BaseException:
            self.shutdown()
            raise
        self.live = set(self.names)

    def _start(self, first: int, bundles: dict[str, dict[str, float]], storage: Storage) -> None:
        config = self.config
        marker = uuid.uuid4().hex
        storage.write_bytes(STORAGE_MARKER, marker.encode())  # every student must see it: the storage is shared
        payload = config.model_dump(mode="json")
        restarts = -1 if self.policy.restarts_processes else 0
        shards = config.runtime.coordinator.shards
        self.shards = [  # each serves its rows of every step; the first also holds records, evaluation, services
            CoordinatorActor.options(
                num_cpus=config.runtime.coordinator.cpus,
                num_gpus=config.runtime.coordinator.gpus,
                max_restarts=restarts,
                scheduling_strategy=bundle_strategy(self.group, first + shard),
            ).remote(payload, shard)
            for shard in range(shards)
        ]
        self.coordinator = self.shards[0]
        self.rpc_address = self._serve_rpc()  # before the students start: external ones may join meanwhile
        self.lane = self._serve_lane()
        self.actors = {
            name: StudentActor.options(
                num_cpus=bundles[name]["CPU"],
                num_gpus=bundles[name].get("GPU", 0),
                max_restarts=restarts,
                scheduling_strategy=bundle_strategy(self.group, first + shards + position),
            ).remote(payload, config.student_names().index(name),
                     config.runtime.torch_threads or max(1, int(bundles[name]["CPU"])), storage.url, marker)
            for position, name in enumerate(self.names)
        }
        self.infos = dict(zip(self.names, self._started({name: actor.info.remote() for name, actor in self.actors.items()})))
        _get_with_user_errors([shard.register.remote(info) for shard in self.shards for info in self.infos.values()], self._start_s)
        states = ray.get([shard.state.remote() for shard in self.shards], timeout=self._start_s)
        self.incarnations: list[str] = [state["incarnation"] for state in states]
        self._coordinator_states = states  # where each shard runs, so where its lane listens, from the first chunk on
        self.metrics_address = self._serve_metrics()
        self._wait_for_external_students()
        self.steps_per_epoch = ray.get(self.coordinator.state.remote(), timeout=self._start_s)["steps_per_epoch"]
        self._update_placements()

    def _started(self, calls: dict[str, ray.ObjectRef]) -> list[Any]:
        """The first answers of the students' new actors (by name), within ``runtime.ray.start_timeout_s``: a student
        whose start hangs (a stalled data mount, a model that never builds) ends the run naming it, instead of holding
        the driver, and an external student that joined early, for ever."""
        _done, late = ray.wait(list(calls.values()), num_returns=len(calls), timeout=self._start_s)
        if late:
            hung = [name for name, reference in calls.items() if reference in late]
            raise ClusterError(f"student(s) {', '.join(hung)} did not start within {self._start_s:.0f} s (runtime.ray.start_timeout_s)")
        return _get_with_user_errors(list(calls.values()))

    def placements(self) -> dict[str, dict[str, Any]]:
        """Where each student runs (node id, GPU ids, device, pid); one being restarted keeps its last known place."""
        return _answers({name: self.actors[name].placement.remote() for name in self.names}, self.where)

    def _serve_rpc(self) -> str | None:
        """Have the coordinator serve the gRPC cohort service (again, after a restart)."""
        return _get_with_user_errors(self.coordinator.serve_rpc.remote(self.token), self._start_s)

    def _serve_lane(self) -> list[str] | None:
        """Have every coordinator shard open its frame lane (again, after a restart) when the students exchange over TCP."""
        if self.config.runtime.exchange.transport != "tcp":
            return None
        return _get_with_user_errors([shard.serve_lane.remote(self._lane_secret) for shard in self.shards], self._start_s)

    def _lane_of(self, name: str) -> tuple[list[str], str] | None:
        """What student ``name`` needs to exchange over the frame lanes: their addresses and its own key; None (Ray's
        actor calls) where a lane listens on loopback only and the student runs on another node (it may have moved
        there in a restart)."""
        if self.lane is None:
            return None
        shards = [(state["node_id"], state["node_ip"]) for state in self._coordinator_states]
        if len(shards) != len(self.lane):  # a shard that never answered: where its lane listens is not known
            return None
        if not lanes_reach(self.where.get(name, {}).get("node_id"), shards, self.config.runtime.exchange.allow_plaintext):
            if name not in self._through_actor_calls:
                self._through_actor_calls.add(name)
                logger.info(f"student {name} runs on another node than the coordinator: it exchanges through Ray's actor "
                            "calls (runtime.exchange.allow_plaintext: true opens the frame lane to other nodes, in clear)")
            return None
        return self.lane, student_key(self._lane_secret, name)

    def _wait_for_external_students(self) -> None:
        """Wait until every external student has joined the coordinator (a future the coordinator resolves),
        or fail naming the missing ones."""
        if not self.external:
            return
        timeout = self.config.rpc.join_timeout_s
        logger.info(f"waiting up to {timeout:.0f} s for external students {', '.join(self.external)} at "
                    f"{self.rpc_address} (rdml-dist student CONFIG --coordinator {self.rpc_address} --name NAME)")
        missing = ray.get(self.coordinator.wait_for_members.remote(timeout), timeout=timeout + self._start_s)
        if missing:
            raise ExternalStudentsMissing(
                f"external student(s) {', '.join(missing)} did not join the cohort service at {self.rpc_address} "
                f"within {timeout:.0f} s (rpc.join_timeout_s); start each with: rdml-dist student CONFIG "
                f"--coordinator {self.rpc_address} --name NAME"
            )

    def _serve_metrics(self) -> str | None:
        """Have the coordinator serve its metrics (again, after a restart); keep Prometheus's file_sd current."""
        address = _get_with_user_errors(self.coordinator.serve_metrics.remote(), self._start_s)
        if address is not None and self.file_sd is not None:
            self.file_sd.point_at(address)
        return address

    def _update_placements(self) -> None:
        """Learn (again, after restarts) where every student and the coordinator run, and record it. A process found
        replaced although no call met its death (it died while nothing was asked of it) is reported here; one being
        restarted right now keeps its last known place (the next call to it meets its death)."""
        before = self.where
        self.where = self.placements()
        shards = {str(index): shard.state.remote() for index, shard in enumerate(self.shards)}
        known = {str(index): state for index, state in enumerate(self._coordinator_states)}
        answered = _answers(shards, known)
        if len(answered) < len(self.shards):  # a shard restarting before it ever answered: nothing to record yet
            return
        states = [answered[str(index)] for index in range(len(self.shards))]
        replaced = [(name, before[name]["pid"], self.where[name]["pid"]) for name in self.names
                    if name in before and name in self.where and before[name]["pid"] != self.where[name]["pid"]]
        replaced += [(COORDINATOR, old["pid"], new["pid"]) for old, new in zip(self._coordinator_states, states) if old["pid"] != new["pid"]]
        self._coordinator_states = states
        # a student whose call is still under way, or failed and not yet handled, reports its own death when that
        # call is handled (one whose call succeeded will not: its replacement is counted here)
        awaited = {name for reference, name in self._inflight.items() if not _succeeded(reference)}
        unreported = [(who, old, new) for who, old, new in replaced if who not in self._reported_deaths | awaited]
        self._reported_deaths.clear()
        for who, old, new in unreported:  # a failure like any other: the policy counts it (and may stop the run)
            kind = FailureKind.COORDINATOR_DIED if who == COORDINATOR else FailureKind.STUDENT_DIED
            student = None if who == COORDINATOR else who
            failure = Failure(kind.value, self.latest_checkpoint or 0, f"its process was replaced (pid {old} -> {new})",
                              student=student, node=self.where.get(who, {}).get("node_id"))
            self._events.append({**failure.event(), "action": "found replaced by a new process"})
            self.policy.decide(failure)
        lanes = self.lane if self.lane else [None] * len(self.shards)
        coordinator = {"node_id": states[0]["node_id"], "pid": states[0]["pid"], "metrics": self.metrics_address,
                       "rpc": self.rpc_address, "lane": lanes[0]}
        if len(self.shards) > 1:
            coordinator["shards"] = [{"node_id": state["node_id"], "pid": state["pid"], "lane": lane} for state, lane in zip(states, lanes)]
        external = {name: {"external": True, "coordinator": self.rpc_address} for name in self.external}
        try:
            self.record_placements({**self.where, **external}, coordinator)
        except OSError as error:  # a record for operators and tests, not the run's state: written again at the next change
            logger.warning(f"placements.json not written ({one_line(error)}); it is written again when a process moves")

    def live_members(self) -> list[str]:
        return [name for name in self.names if name in self.live]

    def publish_state(self, state: DriverState) -> None:
        """Tell every coordinator shard the driver's state (status, metrics); nothing waits for it."""
        for shard in self.shards:
            shard.set_driver_state.remote(state.value)

    # -- failures: one cause, one kind, one decision --------------------------------------------
    def _failure(self, error: BaseException, source: str, step: int, restoring: bool = False) -> Failure:
        """``error``, met on a call to ``source`` at ``step``, as a classified failure. A student's call that broke
        while a coordinator died (or was replaced) is the coordinator's failure: Ray's account says more (not while
        ``restoring``, when the coordinator is expected to be a new process)."""
        cause = cause_of(error, source)
        if source != COORDINATOR and not restoring and not isinstance(cause, (ProcessDied, StudentRestarted)):
            death = self._coordinator_death()
            if death is not None:
                cause, source = death, COORDINATOR
        kind = classify(cause, source)
        if kind in (FailureKind.STUDENT_DIED, FailureKind.COORDINATOR_DIED):
            self._reported_deaths.add(source if kind is FailureKind.STUDENT_DIED else COORDINATOR)
        student = None if source == COORDINATOR or kind in (FailureKind.COORDINATOR_DIED, FailureKind.COORDINATOR_ERROR) else source
        node = self.where.get(student, {}).get("node_id") if student else None
        described = str(cause) if isinstance(cause, ProcessDied) else one_line(cause)  # Ray's own account of the death
        return Failure(kind.value, step, described, student=student, node=node)

    def _coordinator_death(self) -> BaseException | None:
        """Why a coordinator shard cannot answer as the one the driver restored, or None while all can."""
        try:
            states = ray.get([shard.state.remote() for shard in self.shards], timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
            return cause_of(error, COORDINATOR)
        for index, (state, incarnation) in enumerate(zip(states, self.incarnations)):
            if state["incarnation"] != incarnation:
                return CoordinatorReplaced(f"coordinator shard {index} was restarted (pid {state['pid']}) and lost its state")
        return None

    def _current_step(self, default: int) -> int:
        """The step the coordinator is at (the failing one, when a student fails in a chunk), if it can still say."""
        try:
            state = ray.get(self.coordinator.state.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return default
        return state["step"] if state["incarnation"] == self.incarnations[0] else default

    def _handle(self, failure: Failure, pending: Iterable[ray.ObjectRef] = (), may_continue: bool = True) -> None:
        """Hand ``failure`` to the policy. Returns when the live students go on (``continue``, with a checkpoint to
        rejoin from and some student still live); else the cohort stops and rolls back (raises)."""
        try:
            decision = self.policy.decide(failure)
        except RunFailed:
            self._abort(failure)
            raise
        if failure.kind == FailureKind.STUDENT_DIED.value and failure.student is not None:
            self.coordinator.student_restarted.remote(failure.student)  # metrics only, and only for a restart
        others = [name for name in self.live if name != failure.student] + list(self.external)
        if decision is Decision.CONTINUE and may_continue and self.latest_checkpoint is not None and others:
            return
        self._roll_back(failure, list(pending))

    def _abort(self, failure: Failure) -> bool:
        """Fail every step waiting on a coordinator shard now (a dead one already failed its callers); whether every
        shard heard it."""
        try:
            ray.get([shard.abort.remote(failure.describe()) for shard in self.shards], timeout=10)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def _roll_back(self, failure: Failure, pending: list[ray.ObjectRef]) -> None:
        """Stop the chunk on every student and have the loop take the cohort back to its latest checkpoint.

        The calls still under way fail with the abort's echo; a student that died meanwhile is reported
        (the restore brings it back with the cohort), never silently dropped.
        """
        aborted = self._abort(failure)
        deaths = []
        if pending:
            done, hung = ray.wait(pending, num_returns=len(pending), timeout=self._patience_s)
            if aborted:  # else the calls may wait on a coordinator that never heard the abort: they are not the ones hung
                deaths.extend(self._kill_hung(failure, hung))
            for reference in done:
                name = self._inflight.get(reference)
                died = _own_death(reference)
                if name is not None and died is not None and name != failure.student:
                    self._reported_deaths.add(name)
                    death = Failure(FailureKind.STUDENT_DIED.value, failure.step, one_line(died), student=name,
                                    node=self.where.get(name, {}).get("node_id"))
                    deaths.append({**death.event(), "action": "restored with the cohort"})
                    try:
                        self.policy.decide(death)  # counted like any failure: a run past its budget stops here
                    except RunFailed as stopped:
                        stopped.events[:0] = [{**failure.event(), "action": "the cohort was rolling back"}, *deaths[:-1]]
                        raise
        raise CohortRollback(failure.event(), deaths)

    def _kill_hung(self, failure: Failure, hung: list[ray.ObjectRef]) -> list[dict[str, Any]]:
        """Kill the students whose calls outlived the abort by the operation's patience (stuck in their own code,
        where no abort reaches) so that Ray restarts them and the restore brings them back: a hung process would
        otherwise hold every later call to its actor behind the stuck one. Part of the failure being handled, not
        counted again."""
        events = []
        for reference in hung:
            name = self._inflight.get(reference)
            if name is None or name not in self.actors:
                continue
            ray.kill(self.actors[name], no_restart=False)
            self._reported_deaths.add(name)  # its new process is this event's, not a failure found later
            hung_student = dataclasses.replace(failure, student=name, node=self.where.get(name, {}).get("node_id"))
            events.append({**hung_student.event(), "action": "killed (its call hung past the abort); restored with the cohort"})
        return events

    def _on_coordinators(self, call: Callable[["ray.actor.ActorHandle", str], ray.ObjectRef], step: int,
                         pending: Iterable[ray.ObjectRef] = (), first_only: bool = False) -> list[Any]:
        """``call(shard, incarnation)`` on every coordinator shard (or the first only: it alone holds what only it
        is sent, the evaluations); a failure goes to the policy (rolls back)."""
        shards = list(zip(self.shards, self.incarnations))[: 1 if first_only else None]
        references = [call(shard, incarnation) for shard, incarnation in shards]
        try:
            return ray.get(references, timeout=self._stall_s())
        except ray.exceptions.RayError as error:
            self._handle(self._failure(error, COORDINATOR, step), pending, may_continue=False)
            raise  # unreachable: a coordinator's failure always rolls back

    # -- one chunk of steps ---------------------------------------------------------------------
    def run_steps(self, start: int, end: int, restore_step: int, on_progress: Callable[[int], None]) -> list[dict[str, Any]]:
        """Steps ``[start, end)``: the driver waits on the students' calls and on the coordinator's next step."""
        self.latest_checkpoint = restore_step
        calls = {
            self.actors[name].run_steps.remote(start, end, self.shards, restore_step, self._lane_of(name)): name
            for name in self.live_members()
        }
        self._inflight = dict(calls)  # the calls still under way (the chunk takes each out as it ends)
        self._patience_s = self.config.runtime.ray.exchange_timeout_s  # the abort releases a step's waits at once
        events: list[dict[str, Any]] = []
        try:
            self._follow_chunk(calls, events, start, end, restore_step, on_progress)
            events.extend(self._count_dropped())
            return [*self._pop_recoveries(), *events]
        except CohortRollback as rollback:  # what the chunk met before the rollback stays in the run's faults
            rollback.earlier[:0] = [*self._pop_recoveries(), *events]
            raise
        except RunFailed as stopped:  # and before the policy stopped the run, and the drops it had no time to count
            stopped.events[:0] = [*self._pop_recoveries(), *events]
            stopped.events.extend(_uncounted(self._pop_dropped()))
            raise

    def _pop_recoveries(self) -> list[dict[str, Any]]:
        """The students' non-finite recoveries the coordinator holds (none when it died with them)."""
        try:
            return ray.get(self.coordinator.pop_recoveries.remote(), timeout=10)  # a wedged coordinator must not hold a failure
        except ray.exceptions.RayError:
            return []

    def _count_dropped(self) -> list[dict[str, Any]]:
        """The external students the coordinator dropped in the chunk (silent past the exchange timeout, under
        ``continue``), each a failure the policy counts (raises :class:`RunFailed` past the budget, listing every drop).

        Counted once the chunk has ended; a chunk rolled back first leaves them held for the next one (a restarted
        coordinator has lost them)."""
        events: list[dict[str, Any]] = []
        dropped = self._pop_dropped()
        for index, failure in enumerate(dropped):
            try:
                self.policy.decide(failure)
            except RunFailed as stopped:
                stopped.events[:0] = events
                stopped.events.extend(_uncounted(dropped[index + 1:]))
                raise
            events.append({**failure.event(), "action": "the live students went on without it; it joins again when it sends"})
        return events

    def _pop_dropped(self) -> list[Failure]:
        """The drops the coordinator holds, as failures (none without external students, or when it cannot say)."""
        if not self.external:
            return []
        try:
            held = ray.get(self.coordinator.pop_dropped.remote(), timeout=10)
        except ray.exceptions.RayError:
            return []  # the coordinator's failure is met by the next call, which the policy answers
        return [Failure(FailureKind.STUDENT_SILENT.value, entry["step"], entry["cause"], student=entry["student"]) for entry in held]

    def _follow_chunk(self, calls: dict[ray.ObjectRef, str], events: list[dict[str, Any]], start: int, end: int,
                      restore_step: int, on_progress: Callable[[int], None]) -> None:
        """Wait for the chunk's calls and the coordinator's steps; what the chunk meets goes into ``events``."""
        rejoining: list[str] = []
        pending = list(calls)
        step = start
        watch: ray.ObjectRef | None = self._next_step(step, end)
        stall = self._stall_s()
        while pending or step < end:  # the coordinator too must reach ``end``: external students may still be stepping
            done, _ = ray.wait([*pending, *([watch] if watch is not None else [])], num_returns=1, timeout=stall)
            if not done:
                self._handle(Failure(FailureKind.TIMEOUT.value, step, f"no step of the cohort finished within {stall:.0f} s"),
                             pending, may_continue=False)
            if done[0] == watch:
                step = self._from_watch(watch, step, pending)
                on_progress(step)
                watch = self._next_step(step, end) if step < end else None  # none left behind at the chunk's end
                continue
            pending.remove(done[0])
            self._inflight.pop(done[0], None)
            name = calls[done[0]]
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as error:
                events.append(self._lose_student(name, error, self._current_step(step), pending))
                rejoining.append(name)
        for name in rejoining:
            # The epoch the chunk ending at ``end`` belongs to: its end (if any) is closed by evaluate().
            self._rejoin(name, restore_step, (end - 1) // self.steps_per_epoch, end)

    def _stall_s(self) -> float:
        """How long the driver waits on any call before it counts as hung: the exchange timeout and a margin."""
        return self.config.runtime.ray.exchange_timeout_s + STALL_MARGIN_S

    def _next_step(self, after: int, end: int) -> ray.ObjectRef:
        """A future of the coordinator's step once it has moved past ``after`` and the progress interval passed, or
        it reached the chunk's ``end``."""
        watch = self.coordinator.step_after.remote(after, self.incarnations[0], PROGRESS_INTERVAL_S, end)
        self._watches.append(watch)
        return watch

    def _forget_watches(self) -> None:
        """Collect the next-step futures that stopped chunks left behind: their errors (the abort, a dead
        coordinator) are known and must not be logged as unhandled."""
        for watch in self._watches:
            try:
                ray.get(watch, timeout=0)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        self._watches.clear()

    def _from_watch(self, watch: ray.ObjectRef, step: int, pending: list[ray.ObjectRef]) -> int:
        try:
            self._watches.remove(watch)
            return ray.get(watch)
        except ray.exceptions.RayError as error:
            self._handle(self._failure(error, COORDINATOR, step), pending, may_continue=False)
            raise  # unreachable

    def _lose_student(self, name: str, error: ray.exceptions.RayError, step: int, pending: list[ray.ObjectRef]) -> dict[str, Any]:
        """A call on student ``name`` failed at ``step``. Under ``continue`` it leaves the cohort (returns the
        event) and the caller has it rejoin; anything else rolls the cohort back (raises)."""
        failure = self._failure(error, name, step)
        self._handle(failure, pending)
        try:
            self._on_coordinators(lambda shard, incarnation: shard.mark_dead.remote(name, incarnation), step, pending)
        except CohortRollback as rollback:  # the coordinator failed too: the student's failure is still reported
            rollback.earlier.append({**failure.event(), "action": "restored with the cohort (the coordinator failed too)"})
            raise
        self.live.discard(name)
        return {**failure.event(), "action": "the live students went on"}

    def _wait_until_restarted(self, actor: "ray.actor.ActorHandle", who: str, step: int) -> None:
        """Wait until Ray has a process for ``actor`` again; one that never comes back fails the run."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=10)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                if time.monotonic() > deadline or isinstance(error, ray.exceptions.ActorDiedError):
                    failure = self._failure(error, who, step)
                    raise RunFailed(f"{failure.describe()}; it was not restarted within {RESTART_TIMEOUT_S:.0f} s", failure) from None
                time.sleep(RESTART_POLL_S)  # Ray is starting its process: there is no future to wait on yet

    def _rejoin(self, name: str, restore_step: int, cohort_epoch: int, step: int) -> None:
        """A student lost under ``continue`` restores its checkpoint of ``restore_step``, catches up with the cohort's
        epoch and takes part again. Failing meanwhile is a failure like any other: the policy counts it and,
        under ``continue``, the rejoin is tried again."""
        while True:
            try:
                self._wait_until_restarted(self.actors[name], name, step)
                info = ray.get(self.actors[name].restore.remote(restore_step, cohort_epoch))
            except ray.exceptions.RayError as error:
                failure = self._failure(error, name, step)
                self._handle(failure)
                self._events.append({**failure.event(), "action": "the live students went on; it rejoins again"})
                continue
            self._on_coordinators(lambda shard, incarnation: shard.revive.remote(info, incarnation), step)
            self.live.add(name)
            self._update_placements()
            return

    # -- epoch end, checkpoints, restore --------------------------------------------------------
    def evaluate(self, epoch: int) -> EpochEvaluation:
        end = (epoch + 1) * self.steps_per_epoch
        self._on_live_students(lambda actor: actor.evaluate.remote(epoch, self.coordinator, self.incarnations[0]), end, epoch)
        timeout = self.config.runtime.ray.exchange_timeout_s
        return self._on_coordinators(
            lambda shard, incarnation: shard.evaluation.remote(epoch, timeout, incarnation), end, first_only=True)[0]

    def pop_records(self, before_step: int) -> list[StepRecord]:
        return merge_records(self._on_coordinators(
            lambda shard, incarnation: shard.pop_records.remote(before_step, incarnation), before_step))

    def pop_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def save_checkpoint(self, step: int) -> None:
        self._on_live_students(lambda actor: actor.save_checkpoint.remote(step), step, step // self.steps_per_epoch)

    def _on_live_students(self, call: Callable[["ray.actor.ActorHandle"], ray.ObjectRef], step: int, cohort_epoch: int) -> None:
        """Run ``call`` on every live student. One that fails meanwhile goes to the policy: under ``continue`` it is
        restarted at ``cohort_epoch`` from the latest checkpoint and called again, else the cohort rolls back."""
        calls = {call(self.actors[name]): name for name in self.live_members()}
        self._inflight = calls
        self._patience_s = self._stall_s()  # no abort stops a scoring or a checkpoint: the bound such calls get
        while calls:
            done, _ = ray.wait(list(calls), num_returns=1, timeout=self._stall_s())
            if not done:  # a student wedged (a stalled store, a hung call) must not hang the driver
                self._handle(self._stalled(sorted(calls.values()), step), list(calls), may_continue=False)
            name = calls.pop(done[0])
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as error:
                self._events.append(self._lose_student(name, error, step, list(calls)))
                self._rejoin(name, self.latest_checkpoint, cohort_epoch, step)
                calls[call(self.actors[name])] = name

    def _stalled(self, students: list[str], step: int) -> Failure:
        """The timeout of calls on ``students`` that did not answer within the driver's bound (one is named as the source)."""
        bound = f"within {self._stall_s():.0f} s"
        if len(students) > 1:
            return Failure(FailureKind.TIMEOUT.value, step, f"students {', '.join(students)} did not answer {bound}")
        return Failure(FailureKind.TIMEOUT.value, step, f"no answer {bound}", student=students[0],
                       node=self.where.get(students[0], {}).get("node_id"))

    def restore(self, step: int | None) -> None:
        """Every student (restarted ones included) and the coordinator go back to the checkpoint of ``step`` (None: to
        the initial state). A failure meanwhile goes to the policy, and the loop rolls back and restores again."""
        at = step or 0
        self._forget_watches()
        self._inflight = {}  # nothing asked before the rollback will report a death now: the restore finds them
        try:
            for name, actor in self.actors.items():
                self._wait_until_restarted(actor, name, at)
            for shard in self.shards:
                self._wait_until_restarted(shard, COORDINATOR, at)
            self.rpc_address = self._serve_rpc()
            self.lane = self._serve_lane()
            self.metrics_address = self._serve_metrics()
            epoch = at // self.steps_per_epoch
            calls = {self.actors[name].restore.remote(step, epoch): name for name in self.names}
            infos: list[StudentInfo] = [self._get_or_handle(reference, name, at, calls) for reference, name in calls.items()]
            self.incarnations = [self._get_or_handle(shard.restore.remote(at, infos), COORDINATOR, at, {}) for shard in self.shards]
            self._wait_for_external_students()  # a restarted coordinator knows none of them until they join again
            self.live = set(self.names)
            self.latest_checkpoint = step
            self._update_placements()
        except ray.exceptions.RayError as error:  # a call outside the restore calls proper (serving, placements)
            self._handle(self._failure(error, COORDINATOR, at, restoring=True), may_continue=False)
        except ExternalStudentsMissing as missing:  # they did not join the restarted coordinator in time
            self._handle(Failure(FailureKind.TIMEOUT.value, at, str(missing)), may_continue=False)

    def _get_or_handle(self, reference: ray.ObjectRef, source: str, step: int, others: dict[ray.ObjectRef, str]) -> Any:
        try:
            return ray.get(reference, timeout=self._stall_s())
        except ray.exceptions.RayError as error:
            self._handle(self._failure(error, source, step, restoring=True), others, may_continue=False)
            raise  # unreachable

    def shutdown(self) -> None:
        """Release the actors and the reservation whatever else fails; a file_sd entry that cannot be removed is
        logged, never raised (it would replace the run's own outcome)."""
        try:
            if self.file_sd is not None:
                self.file_sd.remove()
        except OSError as error:
            logger.warning(f"monitoring.file_sd: this run's target could not be removed from {self.file_sd.path} ({error})")
        finally:
            for actor in [*self.actors.values(), *self.shards]:
                ray.kill(actor, no_restart=True)
            if self.owns_group:
                ray.util.remove_placement_group(self.group)


def _uncounted(dropped: list[Failure]) -> list[dict[str, Any]]:
    """The events of drops that the run stopped before counting."""
    return [{**failure.event(), "action": "not counted: the run stopped"} for failure in dropped]


def _succeeded(reference: ray.ObjectRef) -> bool:
    """Whether a call has ended without an error (without waiting: one under way raises ``GetTimeoutError``, a
    ``RayError``; its result stays to be read again)."""
    try:
        ray.get(reference, timeout=0)
    except ray.exceptions.RayError:
        return False
    return True


def _answers(references: dict[str, ray.ObjectRef], previous: dict[str, Any]) -> dict[str, Any]:
    """Each actor's answer by name; one that is being restarted keeps its ``previous`` answer (or none)."""
    answers = {}
    for name, reference in references.items():
        try:
            answers[name] = ray.get(reference, timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if name in previous:
                answers[name] = previous[name]
    return answers


def _own_death(reference: ray.ObjectRef) -> BaseException | None:
    """The error of a finished student call when it is the student's own death (not the abort's echo), else None."""
    try:
        ray.get(reference, timeout=0)
    except ray.exceptions.RayTaskError as error:
        return error.cause if isinstance(error.cause, StudentRestarted) else None
    except ray.exceptions.RayActorError as error:
        return error
    except ray.exceptions.RayError:
        return None
    return None


def _get_with_user_errors(references: Any, timeout_s: float | None = None) -> Any:
    """``ray.get``, with an error meant for the user raised inside an actor (a config problem met by a
    student, a model factory that fails, a port the coordinator cannot bind) re-raised as itself: one line
    in the CLI, not a traceback."""
    try:
        return ray.get(references, timeout=timeout_s)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (ConfigError, ClusterError)):
            raise error.cause from None
        if classify(cause_of(error, COORDINATOR), COORDINATOR) is FailureKind.USER_ERROR:
            raise error.cause from None
        raise
