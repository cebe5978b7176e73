"""The real CoordinatorActor over Ray: per-frame rejection without poisoning peers, and dead members."""

import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.coordinator_core.coordinator import PendingStep
from rdml_dist.divergence import MimicryResult, mimicry_gradients
from rdml_dist.engines.ray_actors import CONTROL_GROUP, Coordinator, CoordinatorActor
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.messages import LogitsFrame, MimicryReply, StudentInfo
from tests.integration.conftest import make_config

NUM_TRAIN, BATCH, CLASSES, SEED = 20, 8, 4, 7
TIMEOUT = 30  # seconds, for every ray.get


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _start(names: list[str], tmp_path: Path, actor: Any = CoordinatorActor) -> "ray.actor.ActorHandle":
    config = make_config(
        tmp_path,
        [{"name": name, "model": "mlp"} for name in names],
        seed=SEED,
        training={"batch_size": BATCH, "epochs": 2},
        mimicry={"alpha": 2.0, "temperature": 2.0, "weight": 0.5},
        ray={"exchange_timeout_s": 20},
    )
    coordinator = actor.options(max_restarts=0).remote(config.model_dump(mode="json"))
    steps = len(batch_plan(NUM_TRAIN, BATCH, SEED, 0))
    ray.get(
        [coordinator.register.remote(StudentInfo(name, NUM_TRAIN, 10, CLASSES, steps)) for name in names],
        timeout=TIMEOUT,
    )
    return coordinator


@pytest.fixture
def pair(tmp_path: Path) -> Iterator["ray.actor.ActorHandle"]:
    coordinator = _start(["a", "b"], tmp_path)
    yield coordinator
    ray.kill(coordinator)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator["ray.actor.ActorHandle"]:
    coordinator = _start(["a", "b", "c"], tmp_path)
    yield coordinator
    ray.kill(coordinator)


def _batch(step: int) -> torch.Tensor:
    steps = len(batch_plan(NUM_TRAIN, BATCH, SEED, 0))
    return batch_plan(NUM_TRAIN, BATCH, SEED, step // steps)[step % steps]


def _frame(student: str, step: int, *, logits: torch.Tensor | None = None, batch_hash: str | None = None) -> LogitsFrame:
    indices = _batch(step)
    if logits is None:
        logits = torch.randn(len(indices), CLASSES, generator=torch.Generator().manual_seed(zlib.crc32(f"{student}:{step}".encode())))
    return LogitsFrame(
        student=student,
        step=step,
        batch_hash=batch_hash or indices_hash(indices),
        logits=logits,
        ce_loss=1.0,
        correct=0,
        labelled=len(indices),
        correct_clean=0,
    )


def _wait_for(coordinator: "ray.actor.ActorHandle", waiting: list[str]) -> None:
    """Poll the control-group ``state`` until the barrier waits exactly for ``waiting``."""
    deadline = time.monotonic() + TIMEOUT
    while (state := ray.get(coordinator.state.remote(), timeout=TIMEOUT))["waiting_for"] != waiting:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def _rejected(reference: "ray.ObjectRef", reason: str) -> None:
    with pytest.raises(ray.exceptions.RayTaskError) as error:
        ray.get(reference, timeout=TIMEOUT)
    assert isinstance(error.value.cause, FrameRejected), error.value
    assert isinstance(error.value, FrameRejected)  # Ray's wrapper also is-a FrameRejected
    assert reason in str(error.value.cause), str(error.value.cause)


def _alone(reply: MimicryReply, step: int) -> None:
    """The reply of a student whose only peer was rejected in this step: no peer, no mimicry."""
    assert reply.step == step and reply.live_students == 1
    assert reply.mimicry_loss == 0.0
    assert torch.count_nonzero(reply.grad) == 0 and reply.grad.shape == (len(_batch(step)), CLASSES)


@pytest.mark.timeout(90)
def test_a_bad_frame_is_rejected_to_its_sender_and_the_peer_step_completes(pair: "ray.actor.ActorHandle") -> None:
    # Step 0: b is already waiting at the barrier when a sends NaN logits.
    waiting_b = pair.exchange.remote(_frame("b", 0))
    _wait_for(pair, ["a"])
    ready, _ = ray.wait([waiting_b], timeout=0.3)
    assert not ready, "the barrier released b before a's frame arrived"
    nan_logits = torch.randn(len(_batch(0)), CLASSES)
    nan_logits[1, 2] = float("nan")
    _rejected(pair.exchange.remote(_frame("a", 0, logits=nan_logits)), "NaN or infinite")
    _alone(ray.get(waiting_b, timeout=TIMEOUT), 0)

    # Step 1: a's frame is on the wrong batch (the rejected frame arrives first this time).
    _rejected(pair.exchange.remote(_frame("a", 1, batch_hash=indices_hash(_batch(0)))), "batch hash")
    _alone(ray.get(pair.exchange.remote(_frame("b", 1)), timeout=TIMEOUT), 1)

    # Step 2: a frame from a stranger is rejected and changes nothing; a and b exchange normally.
    _rejected(pair.exchange.remote(_frame("mallory", 2)), "unknown student 'mallory'")
    references = [pair.exchange.remote(_frame(name, 2)) for name in ("a", "b")]
    replies = ray.get(references, timeout=TIMEOUT)
    expected = mimicry_gradients(
        torch.stack([_frame(name, 2).logits for name in ("a", "b")]), alpha=2.0, temperature=2.0, mode="pairwise"
    )
    for position, reply in enumerate(replies):
        assert reply.step == 2 and reply.live_students == 2
        torch.testing.assert_close(reply.grad, expected.grads[position] * 0.5 * 2.0**2)
        assert reply.mimicry_loss == pytest.approx(float(expected.losses[position]) * 0.5 * 2.0**2)
        assert torch.count_nonzero(reply.grad) > 0

    state = ray.get(pair.state.remote(), timeout=TIMEOUT)
    assert state["step"] == 3 and state["live"] == ["a", "b"]
    records = ray.get(pair.pop_records.remote(3), timeout=TIMEOUT)
    assert [(record.step, record.student) for record in records] == [(0, "b"), (1, "b"), (2, "a"), (2, "b")]
    # A stale frame (an earlier step) is rejected as well.
    _rejected(pair.exchange.remote(_frame("a", 1)), "cohort is at step 3")


@pytest.mark.timeout(60)
def test_marking_a_member_dead_releases_the_step_for_the_others(trio: "ray.actor.ActorHandle") -> None:
    references = [trio.exchange.remote(_frame(name, 0)) for name in ("a", "b")]
    _wait_for(trio, ["c"])
    ready, _ = ray.wait(references, num_returns=2, timeout=0.3)
    assert not ready, "the step completed without c"
    ray.get(trio.mark_dead.remote("c"), timeout=TIMEOUT)
    replies = ray.get(references, timeout=TIMEOUT)
    expected = mimicry_gradients(
        torch.stack([_frame(name, 0).logits for name in ("a", "b")]), alpha=2.0, temperature=2.0, mode="pairwise"
    )
    for position, reply in enumerate(replies):
        assert reply.step == 0 and reply.live_students == 2
        torch.testing.assert_close(reply.grad, expected.grads[position] * 0.5 * 2.0**2)
    state = ray.get(trio.state.remote(), timeout=TIMEOUT)
    assert state["step"] == 1 and state["live"] == ["a", "b"]
    # The dead member's frames are refused from now on; the two survivors go on without it.
    _rejected(trio.exchange.remote(_frame("c", 1)), "not a live member")
    replies = ray.get([trio.exchange.remote(_frame(name, 1)) for name in ("a", "b")], timeout=TIMEOUT)
    assert [reply.step for reply in replies] == [1, 1] and all(reply.live_students == 2 for reply in replies)


class ComputationFails(Coordinator):
    """The real coordinator actor whose batched computation raises at step 1 (a bug, an OOM, a bad tensor)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        core = self.barrier.core
        mimicry = core.mimicry

        def failing_at_step_1(pending: PendingStep) -> MimicryResult | None:
            if pending.step == 1:
                raise RuntimeError("CUDA out of memory (simulated inside the computation)")
            return mimicry(pending)

        core.mimicry = failing_at_step_1  # type: ignore[method-assign]


@pytest.mark.timeout(60)
def test_a_failed_computation_reaches_every_waiting_student_at_once(tmp_path: Path) -> None:
    actor = ray.remote(num_cpus=0, concurrency_groups={CONTROL_GROUP: 4})(ComputationFails)
    coordinator = _start(["a", "b", "c"], tmp_path, actor=actor)
    try:
        ray.get([coordinator.exchange.remote(_frame(name, 0)) for name in ("a", "b", "c")], timeout=TIMEOUT)
        waiting = [coordinator.exchange.remote(_frame(name, 1)) for name in ("a", "b")]
        _wait_for(coordinator, ["c"])
        started = time.monotonic()
        last = coordinator.exchange.remote(_frame("c", 1))
        for reference in [*waiting, last]:
            with pytest.raises(ray.exceptions.RayTaskError) as error:
                ray.get(reference, timeout=TIMEOUT)
            assert isinstance(error.value.cause, CohortStepFailed)
            assert "step 1: the coordinator's computation failed: RuntimeError: CUDA out of memory" in str(error.value.cause)
        assert time.monotonic() - started < 5  # the exchange timeout is 20 s
        # Until the driver restores the cohort, new frames are refused with the same cause, not left waiting.
        with pytest.raises(ray.exceptions.RayTaskError, match="computation failed"):
            ray.get(coordinator.exchange.remote(_frame("a", 2)), timeout=TIMEOUT)
        infos = [StudentInfo(name, NUM_TRAIN, 10, CLASSES, len(batch_plan(NUM_TRAIN, BATCH, SEED, 0))) for name in "abc"]
        ray.get(coordinator.restore.remote(0, infos), timeout=TIMEOUT)
        replies = ray.get([coordinator.exchange.remote(_frame(name, 0)) for name in ("a", "b", "c")], timeout=TIMEOUT)
        assert [reply.step for reply in replies] == [0, 0, 0]
    finally:
        ray.kill(coordinator)


@pytest.mark.timeout(60)
def test_abort_releases_the_waiting_students_for_a_rollback(trio: "ray.actor.ActorHandle") -> None:
    waiting = [trio.exchange.remote(_frame(name, 0)) for name in ("a", "b")]
    _wait_for(trio, ["c"])
    ray.get(trio.abort.remote("student 'c' died at step 0"), timeout=TIMEOUT)
    for reference in waiting:
        with pytest.raises(ray.exceptions.RayTaskError, match="student 'c' died at step 0"):
            ray.get(reference, timeout=TIMEOUT)
