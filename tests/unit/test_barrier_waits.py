"""The coordinator's barrier is waited on, never polled, and a scrape never waits behind a step's computation."""

import asyncio
import threading

import pytest
import torch
from prometheus_client import generate_latest

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import parse_config
from rdml_dist.errors import CohortStepFailed
from rdml_dist.messages import EvalFrame, StudentInfo
from tests.unit.cohort_barrier import registered_barrier

NAMES = ("a", "b")


def _barrier() -> CohortBarrier:
    config = parse_config({"name": "waits", "students": [{"model": "mlp", "name": name} for name in NAMES],
                           "training": {"batch_size": 8, "epochs": 2}})
    return registered_barrier(config, num_train=20, classes=3, steps_per_epoch=3)


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
