"""The coordinator's barrier is waited on, never polled, and a scrape never waits behind a step's computation."""

import asyncio
import math
import threading

import pytest
import torch
from prometheus_client import generate_latest

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.config import parse_config
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.messages import NOT_LIVE, EvalFrame, LogitsFrame, StepMeasures, StudentInfo
from tests.unit.cohort_barrier import planned_frame, registered_barrier

NAMES = ("a", "b")


def _barrier(exchange_timeout_s: float = 300.0) -> CohortBarrier:
    config = parse_config({"name": "waits", "students": [{"model": "mlp", "name": name} for name in NAMES],
                           "training": {"batch_size": 8, "epochs": 2},
                           "runtime": {"ray": {"exchange_timeout_s": exchange_timeout_s}}})
    return registered_barrier(config, num_train=20, classes=3, steps_per_epoch=3)


def _frame(name: str, step: int) -> LogitsFrame:
    return planned_frame(name, step, torch.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]], 8, num_train=20, steps_per_epoch=3)


def _planned_rows(name: str, step: int) -> LogitsFrame:
    """``name``'s frame of ``step`` with as many rows as the plan's batch of that step (the last one of an epoch is short)."""
    indices = batch_plan(20, 8, 0, step // 3)[step % 3]
    return LogitsFrame(name, step, indices_hash(indices), torch.eye(3)[[row % 3 for row in range(len(indices))]], 1.0, 1, len(indices), 1)


def _eval(name: str, epoch: int = 0) -> EvalFrame:
    return EvalFrame(name, epoch, torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 1]))


def test_a_scrape_does_not_wait_for_the_lock_a_steps_computation_holds() -> None:
    barrier = _barrier()
    scraped = threading.Event()
    with barrier.lock:  # what a step's computation holds for its whole length
        thread = threading.Thread(target=lambda: (generate_latest(barrier.registry), scraped.set()), daemon=True)
        thread.start()
        assert scraped.wait(10), "the scrape waited for the barrier's lock"
    text = generate_latest(barrier.registry).decode()
    assert 'rdml_driver_state{run="waits",state="starting"} 1.0' in text
    barrier.set_driver_state("rolling_back")
    text = generate_latest(barrier.registry).decode()
    assert 'rdml_driver_state{run="waits",state="rolling_back"} 1.0' in text
    assert 'rdml_driver_state{run="waits",state="starting"} 0.0' in text


def test_an_evaluation_is_awaited_until_the_last_student_sends_its_logits() -> None:
    async def scenario() -> None:
        barrier = _barrier()
        waiting = asyncio.ensure_future(barrier.evaluation(0, timeout_s=30))
        barrier.submit_eval(_eval("a"))
        await asyncio.sleep(0)
        assert not waiting.done()  # still one student to go
        barrier.submit_eval(_eval("b"))
        scores = await asyncio.wait_for(waiting, 5)
        assert scores.epoch == 0 and scores.accuracy == {"a": 0.75, "b": 0.75}
        barrier.submit_eval(_eval("b", epoch=1))
        with pytest.raises(TimeoutError, match=r"^epoch 1 was not scored within 0.05 s \(no scores from a\)$"):
            await barrier.evaluation(1, timeout_s=0.05)
        stopped = asyncio.ensure_future(barrier.evaluation(1, timeout_s=30))
        await asyncio.sleep(0)
        barrier.abort("a student died")  # the driver rolls back: whoever waits hears it at once
        with pytest.raises(CohortStepFailed, match="a student died"):
            await asyncio.wait_for(stopped, 5)

    asyncio.run(scenario())


def test_an_epoch_is_scored_when_the_last_student_it_waits_for_leaves() -> None:
    async def scenario() -> None:
        barrier = _barrier()
        waiting = asyncio.ensure_future(barrier.evaluation(0, timeout_s=30))
        barrier.submit_eval(_eval("a"))
        await asyncio.sleep(0)
        assert not waiting.done()
        barrier.mark_dead("b")  # b died before it sent its scores: a's alone score the epoch
        scores = await asyncio.wait_for(waiting, 5)
        assert scores.epoch == 0 and scores.accuracy == {"a": 0.75}

    asyncio.run(scenario())


def test_a_student_lost_before_the_driver_awaits_the_epoch_still_sends_its_scores_when_it_rejoins() -> None:
    """Under ``continue`` the driver restarts a student that died while the cohort scored an epoch and asks it
    again before it awaits the scores: the epoch must wait for it, not be scored by its peers alone."""
    async def scenario() -> None:
        barrier = _barrier()
        barrier.submit_eval(_eval("b"))
        barrier.mark_dead("a")  # nobody awaits epoch 0 yet
        barrier.register(StudentInfo("a", 20, 4, 3, steps_per_epoch=3))  # the restarted student rejoins
        barrier.submit_eval(_eval("a"))
        scores = await asyncio.wait_for(barrier.evaluation(0, timeout_s=30), 5)
        assert scores.accuracy == {"a": 0.75, "b": 0.75} and scores.members == ["a", "b"]

    asyncio.run(scenario())


def test_the_driver_awaits_the_next_step_and_hears_of_a_halt() -> None:
    async def scenario() -> None:
        barrier = _barrier()
        nxt = asyncio.ensure_future(barrier.step_after(0))
        await asyncio.sleep(0)
        assert not nxt.done()
        barrier.abort("the coordinator's computation failed")
        with pytest.raises(CohortStepFailed, match="computation failed"):
            await asyncio.wait_for(nxt, 5)

    asyncio.run(scenario())


def test_an_exchange_times_out_only_while_the_driver_steps_the_cohort() -> None:
    """An external student may join, and send its first frame, long before the Ray students' first step (their
    actors start, the step-0 checkpoint is written); its wait must not time out while the driver starts or
    restores the cohort, and must once the driver steps it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        timeout_s = 0.1
        barrier = _barrier(timeout_s)
        early = asyncio.ensure_future(barrier.exchange(_frame("a", 0)))
        await asyncio.sleep(5 * timeout_s)  # the driver is still starting the cohort
        assert not early.done()
        barrier.set_driver_state("running")
        stepping = loop.time()
        await asyncio.wait({early}, timeout=5)  # b never comes: the clock runs from when the stepping began
        assert early.done() and isinstance(early.exception(), TimeoutError)
        assert 0.9 * timeout_s <= loop.time() - stepping < 2.5
        timeout_s = 1.0  # long enough for b to come under any load once the stepping begins
        barrier = _barrier(timeout_s)  # a rollback: the driver restores the cohort, then steps it again
        barrier.set_driver_state("running")
        barrier.set_driver_state("restoring")
        waiting = asyncio.ensure_future(barrier.exchange(_frame("a", 0)))
        await asyncio.sleep(1.5 * timeout_s)
        assert not waiting.done()
        barrier.set_driver_state("running")
        reply = await asyncio.wait_for(barrier.exchange(_frame("b", 0)), 5)
        assert reply.step == 0 and (await asyncio.wait_for(waiting, 5)).step == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(("compute_s", "arrivals", "answered_first"), [
    ({"a": 0.001, "b": 0.05}, "ba", "b"), ({"a": 0.05, "b": 0.001}, "ba", "a"),
    ({"a": 0.010, "b": 0.011}, "ab", "a"), ({"a": 0.011, "b": 0.010}, "ab", "a"),  # alike: member order, not arrivals
    ({"a": math.inf, "b": 0.05}, "ba", "b"), ({"a": math.nan, "b": -1.0}, "ab", "a"),  # a student's report is not trusted
])
def test_the_slowest_student_is_answered_first(compute_s: dict[str, float], arrivals: str, answered_first: str) -> None:
    """The slowest student is on the cohort's critical path: its reply goes out before its peers', who wait for it
    anyway; students whose compute is alike keep member order, whichever arrived last."""
    async def scenario() -> None:
        barrier = _barrier()
        barrier.set_driver_state("running")
        for name, seconds in compute_s.items():
            barrier.record_measures(name, StepMeasures(0, seconds, 0.0))
        answered: list[str] = []
        exchanges = []
        for name in arrivals:
            exchange = asyncio.ensure_future(barrier.exchange(_frame(name, 0)))
            exchange.add_done_callback(lambda _done, name=name: answered.append(name))
            exchanges.append(exchange)
            await asyncio.sleep(0.01)
        replies = await asyncio.wait_for(asyncio.gather(*exchanges), 5)
        assert [reply.step for reply in replies] == [0, 0] and answered[0] == answered_first, answered

    asyncio.run(scenario())


def _mixed_barrier(on_student_failure: str, exchange_timeout_s: float) -> CohortBarrier:
    """Ray students ``a`` and ``b`` and the external student ``x``, stepping under ``on_student_failure``."""
    students = [{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "b"}, {"model": "mlp", "name": "x", "external": True}]
    config = parse_config({"name": "waits", "students": students, "training": {"batch_size": 8, "epochs": 2},
                           "rpc": {"enabled": True, "port": 50051},
                           "runtime": {"engine": "ray", "ray": {"exchange_timeout_s": exchange_timeout_s},
                                       "fault": {"on_student_failure": on_student_failure}}})
    barrier = registered_barrier(config, num_train=20, classes=3, steps_per_epoch=3)
    barrier.set_driver_state("running")
    return barrier


@pytest.mark.parametrize("on_student_failure", ["continue", "restart_cohort"])
def test_under_continue_a_step_goes_on_without_a_silent_external_student(on_student_failure: str) -> None:
    """Under ``continue``, the external student a step still waits for at the exchange timeout is dropped: the step's
    waiting students get their gradients, the drop is handed to the driver once, and the silent student's late frame
    is refused as not live. Any other policy times the step out, as does a step still waiting for a Ray student."""
    async def scenario() -> None:
        timeout_s = 0.2
        barrier = _mixed_barrier(on_student_failure, timeout_s)
        waiting = [asyncio.ensure_future(barrier.exchange(_frame(name, 0))) for name in "ab"]
        done, _ = await asyncio.wait(waiting, timeout=5)
        assert len(done) == 2
        if on_student_failure != "continue":
            assert all(isinstance(exchange.exception(), TimeoutError) for exchange in waiting)
            assert barrier.pop_dropped() == [] and "x" in barrier.core.live
            return
        assert [exchange.result().step for exchange in waiting] == [0, 0]
        assert all(reply.live_students == 2 for reply in (exchange.result() for exchange in waiting))
        assert barrier.pop_dropped() == [{"student": "x", "step": 0, "cause": "no frame for step 0 within the exchange timeout (0.2 s)"}]
        assert barrier.pop_dropped() == []  # handed over once
        with pytest.raises(FrameRejected, match="not a live member") as refused:
            await barrier.exchange(_frame("x", 0))
        assert refused.value.reason == NOT_LIVE
        # a step that waits for a Ray student (b) as well as the silent x times out: the driver finds b itself
        barrier.register(StudentInfo("x", 20, 4, 3, steps_per_epoch=3))  # x joins again
        alone = asyncio.ensure_future(barrier.exchange(_frame("a", 1)))
        await asyncio.wait({alone}, timeout=5)
        assert alone.done() and isinstance(alone.exception(), TimeoutError)
        assert barrier.pop_dropped() == [] and {"b", "x"} <= barrier.core.live

    asyncio.run(scenario())


def test_an_external_student_that_joins_while_the_step_waits_is_dropped_at_the_waiters_timeout() -> None:
    """The waiting students' clients and the driver bound their waits by the exchange timeout: a silent external
    student that (re)joined meanwhile does not extend it; it is dropped with the others, and joins again."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        timeout_s = 2.0
        barrier = _mixed_barrier("continue", timeout_s)
        arrived = loop.time()
        waiting = [asyncio.ensure_future(barrier.exchange(_frame(name, 0))) for name in "ab"]  # x is silent
        await asyncio.sleep(0.25 * timeout_s)
        assert barrier.register(StudentInfo("x", 20, 4, 3, steps_per_epoch=3), joining=True) == 0  # it joins, and is silent
        joined = loop.time()
        replies = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [reply.step for reply in replies] == [0, 0] and "x" not in barrier.core.live
        assert loop.time() < joined + timeout_s, (joined - arrived, loop.time() - arrived)  # not its own timeout later
        assert [entry["student"] for entry in barrier.pop_dropped()] == ["x"]

    asyncio.run(scenario())


@pytest.mark.parametrize("joining", [True, False])
def test_an_epoch_that_ended_before_an_external_student_joined_is_scored_without_it(joining: bool) -> None:
    """An external student joining at the end of epoch 0 never trained that epoch's end and sends no scores for it;
    a Ray student revived there restores its checkpoint and is asked for them, so the epoch waits for it."""
    async def scenario() -> None:
        barrier = _mixed_barrier("continue", 300.0)
        barrier.mark_dead("x")
        for step in range(3):  # epoch 0 (batches of 8, 8 and 4 rows) without x
            await asyncio.wait_for(asyncio.gather(*(barrier.exchange(_planned_rows(name, step)) for name in "ab")), 5)
        barrier.register(StudentInfo("x", 20, 4, 3, steps_per_epoch=3), joining=joining)
        assert barrier.submit_eval(_eval("a")) is None
        scored = barrier.submit_eval(_eval("b"))
        if joining:
            assert scored is not None and set(scored.accuracy) == {"a", "b"}
        else:
            assert scored is None and barrier.core.unscored(0) == ["x"]

    asyncio.run(scenario())
