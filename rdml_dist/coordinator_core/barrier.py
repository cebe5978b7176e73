"""The asynchronous step barrier over the coordinator core, shared by every transport.

Each student's exchange waits here until every live student of the step has arrived; the last
arrival starts the one batched computation that answers them all, outside the lock: a small one
on the event loop itself (no thread hop), a large one on a worker thread, so that the loop and the
cohort's state stay free for status calls meanwhile. The Ray actor methods and the
gRPC service both call into one :class:`CohortBarrier` on one event loop, so Ray students and
external students meet at the same barrier. The core is touched only under ``lock`` (short,
synchronous sections, never held across an ``await``): Ray also calls read-only methods from
other threads.
"""

import asyncio
import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import Gauge

from rdml_dist.config import ExperimentConfig
from rdml_dist.config.schema import OnStudentFailure
from rdml_dist.coordinator_core.coordinator import PendingStep
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.messages import (
    NOT_LIVE, DriverState, EpochEvaluation, EvalFrame, LogitsFrame, MimicryReply, StepRecord, StepMeasures, StudentInfo,
)
from rdml_dist.coordinator_core.metered_coordinator import MeteredCoordinator
from rdml_dist.metrics import CohortMetrics, LockedRegistry


SLOWEST_SHARE = 0.8  # a student within this share of the longest compute is woken with the slowest
RECHECK_AFTER_DROP_S = 1.0  # after a drop the step is computed at once: its waiters look again this soon, not a timeout later


class LockedMetrics:
    """The cohort's metrics, each update taken under ``lock``: the lock a scrape takes instead of the barrier's,
    so a scrape never waits behind a step's computation, and still never sees half an update.

    Inside :meth:`held`, updates are kept instead, for :meth:`apply` to make once the step's replies are on
    their way: a step's metrics cost the students nothing.
    """

    def __init__(self, metrics: CohortMetrics, lock: threading.Lock) -> None:
        self._metrics, self._lock = metrics, lock
        self._held: list[Callable[[], Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._metrics, name)
        if not callable(attribute):
            return attribute

        def locked(*args: Any, **kwargs: Any) -> Any:
            if self._held is not None:
                self._held.append(functools.partial(attribute, *args, **kwargs))
                return None
            with self._lock:
                return attribute(*args, **kwargs)

        return locked

    @contextlib.contextmanager
    def held(self) -> Iterator[list[Callable[[], Any]]]:
        """Keep the updates made inside (under the barrier's lock, which every metered call holds)."""
        held = self._held = []
        try:
            yield held
        finally:
            self._held = None

    def apply(self, held: list[Callable[[], Any]]) -> None:
        with self._lock:
            for update in held:
                update()


class CohortBarrier:
    """Async barrier around the coordinator core: one batched computation answers all students.

    A failed computation, or an abort while the cohort rolls back, fails the step for every
    waiting student at once, and frames are refused until the cohort is restored.
    """

    def __init__(self, config: ExperimentConfig, shard: int = 0, shards: int = 1) -> None:
        self.config = config
        self.lock = threading.Lock()  # the core's: held while a step's inputs are taken and its results applied
        self.metrics_lock = threading.Lock()  # the metrics': held only while they are updated or scraped
        self.registry = LockedRegistry(self.metrics_lock)
        self._metrics = LockedMetrics(CohortMetrics.for_config(config, self.registry), self.metrics_lock)
        self.core = MeteredCoordinator(config, self._metrics, shard=shard, shards=shards)  # type: ignore[arg-type]
        self._step_results: dict[int, asyncio.Future[None]] = {}  # resolved when the step is over
        self._replies: dict[tuple[int, str], asyncio.Future[MimicryReply]] = {}  # (step, student) -> its gradient
        self._scores: dict[int, asyncio.Future[EpochEvaluation]] = {}  # epoch -> its scores, once every live student sent them
        self._members: asyncio.Future[None] | None = None  # resolved once every member has registered
        self.driver_state = DriverState.STARTING.value  # set by the driver: what ``rdml-dist status`` shows
        self._stepping_since: float | None = None  # when the driver last began stepping the cohort; None while it does not
        self._driver_gauge = Gauge("rdml_driver_state", "The driver's state: 1 for the current one, 0 for the others",
                                   ["run", "state"], registry=self.registry)
        for state in DriverState:
            self._driver_gauge.labels(config.name, state.value).set(1 if state.value == self.driver_state else 0)
        self.halted: str | None = None  # why frames are refused, while the cohort rolls back
        self._computing: asyncio.Task[None] | None = None  # the computation under way, if any
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-computation")
        self.inline_below_elements = config.runtime.coordinator.inline_below_elements  # smaller steps skip the thread
        self._external = frozenset(config.external_students())
        self._drops_silent = bool(self._external) and config.runtime.fault.on_student_failure is OnStudentFailure.CONTINUE
        self._dropped: list[dict[str, Any]] = []  # silent external students dropped, until the driver counts them

    def _step_future(self, step: int) -> "asyncio.Future[None]":
        return self._step_results.setdefault(step, asyncio.get_running_loop().create_future())

    def _reply_future(self, step: int, student: str) -> "asyncio.Future[MimicryReply]":
        """The future of a student's reply; a fresh one where its last wait expired or was cancelled."""
        future = self._replies.get((step, student))
        if future is None or (future.done() and (future.cancelled() or isinstance(future.exception(), TimeoutError))):
            future = self._replies[(step, student)] = asyncio.get_running_loop().create_future()
        return future

    def _ready(self) -> bool:
        """Whether the core can compute: the step's last arrival, or (sequential) a refresh.

        Never before every member has registered once: an early external student must not train alone.
        """
        return self.halted is None and len(self.core.info) == len(self.core.members) and self.core.is_complete()

    def _complete_if_ready(self) -> None:
        """Start computing on the worker thread when the core can (called under ``lock``, on the barrier's loop).

        One computation at a time: a second arrival while one runs is taken up when it ends.
        """
        if self._computing is None and self._ready():
            self._computing = asyncio.get_running_loop().create_task(self._compute_while_ready())

    async def _compute_while_ready(self) -> None:
        """Each computation runs outside ``lock`` (a large one also off the event loop), so that status calls,
        scrapes and control calls are answered meanwhile; its inputs are taken, and its results applied, under the lock.

        A result that a halt or a restore overtook is dropped: as if the computation had come after it.
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    with self.lock:
                        step, generation = self.core.step, self.core.generation
                        if not self._ready():
                            return
                        pending = self.core.begin_step()
                    if self._inline(pending):
                        result = self.core.mimicry(pending)
                    else:
                        result = await loop.run_in_executor(self._worker, self.core.mimicry, pending)
                    with self.lock:
                        if self.halted is None and generation == self.core.generation:
                            with self._metrics.held() as held:
                                replies = self.core.finish_step(pending, result)
                            self._deliver(step, self._slowest_first(replies))
                            loop.call_soon(self._metrics.apply, held)  # queued behind the woken students
                except Exception as error:  # noqa: BLE001 - any failure must reach every waiting student
                    with self.lock:
                        if self.halted is None and generation == self.core.generation:
                            self._halt(f"step {step}: the coordinator's computation failed: {type(error).__name__}: {error}")
        finally:
            self._computing = None

    def _inline(self, pending: PendingStep) -> bool:
        """Whether the computation is small enough to run on the event loop (no thread hop either way)."""
        elements = sum(frame.logits.numel() for frame in pending.frames)
        return elements < self.inline_below_elements

    def _slowest_first(self, replies: dict[str, MimicryReply]) -> dict[str, MimicryReply]:
        """The replies in the order their students are woken: the slowest first (those whose compute, as they last
        measured it, is within a fifth of the longest), then the others, each group in member order. The
        slowest student is on the cohort's critical path, its peers wait for it at the next step anyway; woken
        after them on a busy machine, it waited for a core behind their next steps. Alike students all belong
        to the first group, so their order stays the same step after step."""
        compute = {name: _trusted_seconds(self.core.compute_seconds.get(name)) for name in replies}
        longest = max(compute.values(), default=0.0)
        return dict(sorted(replies.items(), key=lambda item: compute[item[0]] < SLOWEST_SHARE * longest))

    def _deliver(self, step: int, replies: dict[str, MimicryReply]) -> None:
        """Wake the answered students, and release the step once the core has moved past it."""
        for name, reply in replies.items():
            future = self._reply_future(step, name)
            if not future.done():  # its student may have stopped waiting (a timeout, a cancelled call)
                future.set_result(reply)
        if self.core.step != step:
            self._end_step(step)

    def _end_step(self, step: int) -> None:
        """Release the step: students still waiting got no gradient because they left while they waited."""
        for (reply_step, name), future in list(self._replies.items()):
            if reply_step == step:
                if not future.done():
                    future.set_exception(FrameRejected(
                        f"student {name!r} is no longer a live member (it left during step {step})", NOT_LIVE))
                del self._replies[(reply_step, name)]
        self._step_future(step).set_result(None)
        self._step_results.pop(step - 1, None)

    def _halt(self, reason: str) -> None:
        """Refuse further frames and fail every waiting student now, until the driver restores the cohort."""
        self.halted = reason
        for future in [*self._step_results.values(), *self._replies.values(), *self._scores.values()]:
            if not future.done():
                future.set_exception(CohortStepFailed(reason))

    def register(self, info: StudentInfo, joining: bool = False) -> int:
        """Admit (or re-admit) a student; the last member to register releases a step that waited for the cohort.
        Returns the cohort's step it takes part from.

        ``joining``: an external student (re)joining at the cohort's current step (:meth:`CohortCoordinator.join`).
        """
        with self.lock:
            if joining:
                self.core.join(info)
            else:
                self.core.register(info)
            step = self.core.step
            self._complete_if_ready()
            if self._members is not None and not self._members.done() and len(self.core.info) == len(self.core.members):
                self._members.set_result(None)
            return step

    async def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Submit one student's logits and wait for its mimicry gradient (the per-step barrier)."""
        await self._finish_step_without(frame)
        with self.lock:
            if self.halted is not None:
                raise CohortStepFailed(self.halted)
            try:
                self.core.submit(frame)
                future = self._reply_future(frame.step, frame.student)
            finally:
                self._complete_if_ready()
        return await self._reply(future, frame.step)

    async def _reply(self, future: "asyncio.Future[MimicryReply]", step: int) -> MimicryReply:
        """The gradient, awaited directly (one loop hop after the computation sets it, where ``wait_for`` over a
        ``shield`` takes three); ``TimeoutError`` once the exchange timeout has passed, unless the step goes on
        without the silent external students it waited for (:meth:`_go_on_without_the_silent`).

        The timeout counts only while the driver steps the cohort: a student that arrives while the driver
        still starts or restores the cohort (actors starting, the step-0 checkpoint) waits for the cohort,
        and its clock starts when the stepping does. That wait ends with the driver: its process gone, the
        coordinator goes too (the student's connection breaks); its rollback fails every waiting student.
        """
        loop = asyncio.get_running_loop()
        timeout_s = self.config.runtime.ray.exchange_timeout_s
        arrived = time.monotonic()
        expiry: asyncio.TimerHandle | None = None

        def expire_unless_waiting_for_the_cohort() -> None:
            nonlocal expiry
            since = self._stepping_since
            left = timeout_s if since is None else max(arrived, since) + timeout_s - time.monotonic()
            if left > 0:
                expiry = loop.call_later(left, expire_unless_waiting_for_the_cohort)
            elif self._go_on_without_the_silent(step):
                expiry = loop.call_later(min(timeout_s, RECHECK_AFTER_DROP_S), expire_unless_waiting_for_the_cohort)
            else:
                _expire(future)

        expiry = loop.call_later(timeout_s, expire_unless_waiting_for_the_cohort)
        try:
            return await future
        finally:
            expiry.cancel()

    def _go_on_without_the_silent(self, step: int) -> bool:
        """At an exchange's timeout under ``continue``: whether ``step`` goes on instead of failing its waiting students.

        It does when every member it still waits for is an external student: each is dropped (marked dead, an event
        the driver counts against the failure budget); its next frame is refused as not live, and it joins again.
        One that joined while the step waited is dropped too: the waiting students' clients and the driver bound
        their waits by the exchange timeout, so the step cannot wait longer for it.
        A step that waits for a Ray student times out as before, for the driver to find that student hung or dead.
        A step that waits for no one is being computed: its gradients are on their way.
        """
        with self.lock:
            if not self._drops_silent or self.halted is not None or self.core.step != step:
                return False
            silent = self.core.waiting_for()
            if not silent:
                return self._computing is not None
            if not self._external.issuperset(silent):
                return False
            timeout_s = self.config.runtime.ray.exchange_timeout_s
            for name in silent:
                self.core.mark_dead(name)
                self._dropped.append({"student": name, "step": step,
                                      "cause": f"no frame for step {step} within the exchange timeout ({timeout_s:g} s)"})
            self._score_awaited()
            self._complete_if_ready()
            return True

    def pop_dropped(self) -> list[dict[str, Any]]:
        """The silent external students dropped since the last call (student, step, cause), handed over once."""
        with self.lock:
            dropped, self._dropped = self._dropped, []
            return dropped

    def refresh(self, frame: LogitsFrame) -> None:
        """Sequential update: the logits of a student that has just applied its gradient; the next turn may go."""
        with self.lock:
            if self.halted is not None:
                raise CohortStepFailed(self.halted)
            self.core.refresh(frame)
            self._complete_if_ready()

    def refuse(self, student: str, step: int, reason: str) -> None:
        """A frame the transport could not even decode: count it, and let the step go on without its sender."""
        with self.lock:
            self.core.refuse(student, step, reason)
            self._complete_if_ready()

    async def _finish_step_without(self, frame: LogitsFrame) -> None:
        """A student done with a step (its frame refused, or its sequential turn over) goes on to its next
        step at once; hold that frame until its peers have finished the step, instead of refusing it as early."""
        with self.lock:
            if self.halted is not None or frame.step != self.core.step + 1 or not self.core.is_done_with(frame.student):
                return
            future = self._step_future(self.core.step)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=self.config.runtime.ray.exchange_timeout_s)
        except CohortStepFailed:
            pass  # the cohort is rolling back: the frame is refused with the same cause below

    def record_measures(self, student: str, measures: StepMeasures | None) -> None:
        """A student's measurement of the last step of a chunk (no next frame carries it)."""
        with self.lock:
            self.core.record_measures(student, measures)

    def submit_eval(self, frame: EvalFrame) -> EpochEvaluation | None:
        """Collect a student's validation logits; the last one scores the epoch and wakes whoever awaits it."""
        with self.lock:
            evaluation = self.core.submit_eval(frame)
            self._score_awaited()
            return evaluation

    def _score_awaited(self) -> None:
        """Hand every awaited epoch that is scored now, or can be (its last missing student left), to whoever awaits it.

        Only awaited ones: the driver awaits an epoch once every live student was asked for its scores, so a
        student that dies before and rejoins under ``continue`` still sends its own.
        """
        for epoch, future in self._scores.items():
            if not future.done():
                evaluation = self._scored(epoch)
                if evaluation is not None:
                    future.set_result(evaluation)

    def _scored(self, epoch: int) -> EpochEvaluation | None:
        """The scores of ``epoch``: kept, or made now if its last missing student has left (under ``lock``)."""
        return self.core.evaluations.get(epoch) or self.core.score_if_complete(epoch)

    def _score_future(self, epoch: int) -> "asyncio.Future[EpochEvaluation]":
        return self._scores.setdefault(epoch, asyncio.get_running_loop().create_future())

    def mark_dead(self, name: str) -> None:
        """Stop waiting for ``name``; a step that only waited for it completes now."""
        with self.lock:
            self.core.mark_dead(name)
            self._score_awaited()
            self._complete_if_ready()

    def abort(self, reason: str) -> None:
        """Fail the current step for everyone (the driver is about to roll the cohort back)."""
        with self.lock:
            self._halt(reason)

    def restore(self, step: int, infos: list[StudentInfo]) -> None:
        """Start again at a checkpoint's ``step`` with these members (after a rollback or a restart)."""
        with self.lock:
            for info in infos:
                self.core.register(info)
            self.core.restore(step)
            self._halt(f"the cohort was restored to its checkpoint of step {step}")
            self._step_results.clear()
            self._replies.clear()
            self._scores.clear()
            self.halted = None

    def student_restarted(self, name: str) -> None:
        """Count a student's restart (its liveness shows 0 until the cohort is restored)."""
        with self.lock:
            self.core.student_restarted(name)

    async def evaluation(self, epoch: int, timeout_s: float) -> EpochEvaluation:
        """Wait until every live student has evaluated ``epoch`` and return the scores (awaited, never polled)."""
        with self.lock:
            evaluation = self._scored(epoch)
            if evaluation is not None:
                return evaluation
            if self.halted is not None:
                raise CohortStepFailed(self.halted)
            future = self._score_future(epoch)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except asyncio.TimeoutError:
            with self.lock:
                evaluation = self._scored(epoch)  # scored just as the wait ended
                if evaluation is not None:
                    return evaluation
                missing = self.core.unscored(epoch)
            waiting = f"no scores from {', '.join(missing)}" if missing else "no live student left to send scores"
            raise TimeoutError(f"epoch {epoch} was not scored within {timeout_s} s ({waiting})") from None

    async def step_after(self, step: int, at_least_s: float = 0.0, until: int | None = None) -> int:
        """The cohort's step once it is past ``step`` and ``at_least_s`` have passed since the call, or it reached
        ``until`` (so a watcher costs one call per interval, not one per step, and still hears a chunk's end at
        once); sooner when the step stops (a halt, a restore: raised)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + at_least_s
        while True:
            with self.lock:
                if self.halted is not None:
                    raise CohortStepFailed(self.halted)
                current = self.core.step
                moved = current > step
                if moved and (loop.time() >= deadline or (until is not None and current >= until)):
                    return current
                future = self._step_future(current)
            if moved:
                await asyncio.wait([future], timeout=deadline - loop.time())  # a timeout leaves the future as it is
                if future.done() and future.exception() is not None:
                    raise future.exception()  # the step stopped (a halt, a restore): the driver hears why at once
            else:
                await asyncio.shield(future)  # a halt or a restore fails it: the driver hears why

    async def wait_for_members(self, timeout_s: float) -> list[str]:
        """Wait until every member has registered (external students join by themselves); returns the missing."""
        if self.unregistered():
            if self._members is None or self._members.done():
                self._members = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._members), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.unregistered()

    def set_driver_state(self, state: str) -> None:
        with self.metrics_lock:
            for known in DriverState:
                self._driver_gauge.labels(self.config.name, known.value).set(1 if known.value == state else 0)
        self.driver_state = state
        if state in _COHORT_NOT_STEPPING:
            self._stepping_since = None
        elif self._stepping_since is None:
            self._stepping_since = time.monotonic()

    def pop_records(self, before_step: int) -> list[StepRecord]:
        with self.lock:
            return self.core.pop_records(before_step)

    def steps_per_epoch(self) -> int | None:
        """The cohort's steps per epoch, once any student has registered."""
        with self.lock:
            return self.core.steps_per_epoch if self.core.info else None

    def unregistered(self) -> list[str]:
        """Members that never registered (external students not yet joined)."""
        with self.lock:
            return [name for name in self.core.members if name not in self.core.info]


_COHORT_NOT_STEPPING = frozenset({DriverState.STARTING.value, DriverState.RESTORING.value})  # an exchange's clock waits


def _trusted_seconds(seconds: float | None) -> float:
    """A student's reported time where it is a positive finite number, else 0: what a student reports is not trusted."""
    return seconds if seconds is not None and seconds > 0 and math.isfinite(seconds) else 0.0


def _expire(future: "asyncio.Future[Any]") -> None:
    if not future.done():
        future.set_exception(TimeoutError())
