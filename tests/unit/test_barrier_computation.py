"""A step's computation runs on the barrier's worker thread: what happens around it while it runs.

Each test holds one computation open (the real one, started only when the test releases it) and
does meanwhile what a student, an external client or the driver may do: leave, send late, abort
and restore. Nothing is polled by time: the tests wait on the computation's own start.
"""

import asyncio
import threading

import pytest
import torch

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import parse_config
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.messages import WRONG_STEP, LogitsFrame, MimicryReply
from tests.unit.cohort_barrier import planned_frame, registered_barrier
from tests.unit.held_computation import HeldComputation

NAMES = ("a", "b", "c")
NUM_TRAIN, BATCH, CLASSES, STEPS = 24, 8, 4, 3
WAIT_S = 10.0  # the bound of every wait here


def _barrier(update: str = "simultaneous") -> CohortBarrier:
    config = parse_config({"name": "held", "students": [{"model": "mlp", "name": name} for name in NAMES],
                           "training": {"batch_size": BATCH, "epochs": 2}, "mimicry": {"update": update}})
    return registered_barrier(config, NUM_TRAIN, CLASSES, STEPS)


def _frame(name: str, step: int, seed: int) -> LogitsFrame:
    logits = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(seed))
    return planned_frame(name, step, logits, BATCH, NUM_TRAIN, STEPS)


async def _at_the_barrier(barrier: CohortBarrier, frames: list[LogitsFrame]) -> list["asyncio.Future[MimicryReply]"]:
    """Exchanges of ``frames``, each submitted (its coroutine past its first step) before this returns."""
    exchanges = [asyncio.ensure_future(barrier.exchange(frame)) for frame in frames]
    await asyncio.sleep(0)
    return exchanges


def test_a_sequential_turns_student_leaving_during_its_computation_does_not_end_the_step() -> None:
    async def scenario() -> None:
        barrier = _barrier("sequential")
        held = HeldComputation(barrier)
        exchanges = dict(zip(NAMES, await _at_the_barrier(barrier, [_frame(name, 0, seed) for seed, name in enumerate(NAMES)])))
        await held.running()  # a's turn
        barrier.mark_dead("a")
        held.release()
        reply_b = await asyncio.wait_for(exchanges["b"], WAIT_S)
        assert reply_b.step == 0 and reply_b.refresh  # b's turn came, and c's waits for b's refreshed logits
        barrier.refresh(_frame("b", 0, 7))
        reply_c = await asyncio.wait_for(exchanges["c"], WAIT_S)
        assert reply_c.step == 0 and not reply_c.refresh
        assert barrier.core.step == 1 and sorted(barrier.core.records[0]) == ["a", "b", "c"]

    asyncio.run(scenario())


def test_a_frame_for_the_step_under_computation_is_refused_as_late_not_dropped() -> None:
    async def scenario() -> None:
        barrier = _barrier()
        held = HeldComputation(barrier)
        barrier.refuse("c", 0, "bad_tensor")  # c's first frame was undecodable: the step goes on without it
        exchanges = await _at_the_barrier(barrier, [_frame("a", 0, 0), _frame("b", 0, 1)])
        await held.running()
        with pytest.raises(FrameRejected) as late:
            await asyncio.wait_for(barrier.exchange(_frame("c", 0, 2)), WAIT_S)
        assert late.value.reason == WRONG_STEP and "came while its gradients were computed" in str(late.value)
        held.release()
        assert [reply.live_students for reply in await asyncio.wait_for(asyncio.gather(*exchanges), WAIT_S)] == [2, 2]
        assert barrier.core.step == 1

    asyncio.run(scenario())


def test_a_computation_that_fails_after_a_restore_overtook_it_leaves_the_restored_cohort_alone() -> None:
    async def scenario() -> None:
        barrier = _barrier()
        held = HeldComputation(barrier, RuntimeError("CUDA out of memory (simulated)"))
        first = await _at_the_barrier(barrier, [_frame(name, 0, seed) for seed, name in enumerate(NAMES)])
        await held.running()
        barrier.abort("student c died")  # the driver rolls the cohort back meanwhile
        barrier.restore(0, [])
        for exchange in first:
            with pytest.raises(CohortStepFailed, match="student c died"):
                await asyncio.wait_for(exchange, WAIT_S)
        again = await _at_the_barrier(barrier, [_frame(name, 0, seed) for seed, name in enumerate(NAMES)])
        held.release()  # fails, but for a step the restore has dropped; the restored step still gets computed
        replies = await asyncio.wait_for(asyncio.gather(*again), WAIT_S)
        assert barrier.halted is None and [reply.step for reply in replies] == [0, 0, 0] and barrier.core.step == 1

    asyncio.run(scenario())


def test_the_drivers_watch_hears_one_step_per_interval_and_a_chunks_end_at_once() -> None:
    async def scenario() -> None:
        barrier = _barrier()

        async def step(index: int) -> None:
            await asyncio.wait_for(asyncio.gather(*[barrier.exchange(_frame(name, index, index)) for name in NAMES]), WAIT_S)

        throttled = asyncio.ensure_future(barrier.step_after(0, at_least_s=WAIT_S))
        await step(0)
        await step(1)
        await asyncio.sleep(0.05)
        assert not throttled.done()  # past step 0 twice over, but its interval has not passed
        at_end = asyncio.ensure_future(barrier.step_after(1, at_least_s=WAIT_S, until=3))
        await step(2)
        assert await asyncio.wait_for(at_end, WAIT_S) == 3  # the chunk's end is heard at once
        barrier.abort("rolled back")
        with pytest.raises(CohortStepFailed, match="rolled back"):
            await asyncio.wait_for(throttled, WAIT_S)  # and a halt at once

    asyncio.run(scenario())


@pytest.mark.parametrize("inline_below_elements", [1 << 19, 0])
def test_a_small_step_is_computed_on_the_event_loop_and_a_large_one_on_the_worker_thread_alike(inline_below_elements: int) -> None:
    async def scenario() -> tuple[list[str], list[MimicryReply]]:
        barrier = _barrier()
        barrier.inline_below_elements = inline_below_elements
        threads: list[str] = []
        mimicry = barrier.core.mimicry

        def observed(pending):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread().name)
            return mimicry(pending)

        barrier.core.mimicry = observed  # type: ignore[method-assign]
        replies = await asyncio.wait_for(
            asyncio.gather(*[barrier.exchange(_frame(name, 0, seed)) for seed, name in enumerate(NAMES)]), WAIT_S)
        return threads, replies

    threads, replies = asyncio.run(scenario())
    assert threads == [threading.main_thread().name if inline_below_elements else "cohort-computation_0"]
    reference = _barrier().core
    for seed, name in enumerate(NAMES):
        reference.submit(_frame(name, 0, seed))
    expected = reference.compute()
    assert all(torch.equal(reply.grad, expected[name].grad) for name, reply in zip(NAMES, replies))


def test_a_steps_metrics_are_applied_right_after_its_replies_are_handed_out() -> None:
    async def scenario() -> tuple[list[float | None], float | None]:
        barrier = _barrier()
        when_answered: list[float | None] = []

        def cohort_step() -> float | None:
            return barrier.registry.get_sample_value("rdml_cohort_step", {"run": "held"})

        async def exchange(frame: LogitsFrame) -> None:
            await barrier.exchange(frame)
            when_answered.append(cohort_step())  # where a transport sends the reply: before the step's metrics

        await asyncio.wait_for(asyncio.gather(*[exchange(_frame(name, 0, seed)) for seed, name in enumerate(NAMES)]), WAIT_S)
        return when_answered, cohort_step()

    when_answered, after = asyncio.run(scenario())
    assert when_answered == [None] * len(NAMES) and after == 1.0
