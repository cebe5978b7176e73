"""The transport-free coordinator core: barrier bookkeeping, frame validation, batched mimicry, scoring."""

import math
from dataclasses import fields

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rdml_dist.config import parse_config
from rdml_dist.coordinator_core.coordinator import CohortCoordinator, score_epoch
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.divergence import mimicry_gradients
from rdml_dist.errors import FrameRejected
from rdml_dist.messages import EvalFrame, LogitsFrame, StepMeasures, StepRecord, StudentInfo
from rdml_dist.metrics import MEASURE_METRICS
from tests.unit.cohort_barrier import planned_frame, registered_barrier

NUM_TRAIN, BATCH, CLASSES = 20, 8, 4


class FakeClock:
    """Deterministic time so that wait times are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def coordinator(clock: FakeClock) -> CohortCoordinator:
    config = parse_config(
        {
            "students": [{"model": "mlp", "name": name} for name in ("a", "b", "c")],
            "training": {"batch_size": BATCH, "epochs": 2},
            "mimicry": {"alpha": 2.0, "temperature": 2.0, "weight": 0.5},
        }
    )
    core = CohortCoordinator(config, clock=clock)
    for name in ("a", "b", "c"):
        core.register(StudentInfo(name, NUM_TRAIN, 5, CLASSES, steps_per_epoch=3))
    return core


def frame(name: str, step: int = 0, logits: torch.Tensor | None = None, **changes: object) -> LogitsFrame:
    """A valid frame for ``step`` (the right batch hash), with ``changes`` applied on top."""
    plan = batch_plan(NUM_TRAIN, BATCH, seed=0, epoch=step // 3)
    values = dict(student=name, step=step, batch_hash=indices_hash(plan[step % 3]), logits=logits, ce_loss=1.0, correct=1, labelled=BATCH, correct_clean=1)
    values.update(changes)
    return LogitsFrame(**values)


def logits_for(seed: int, rows: int = BATCH) -> torch.Tensor:
    return torch.randn(rows, CLASSES, generator=torch.Generator().manual_seed(seed))


def test_step_barrier_and_batched_replies(coordinator: CohortCoordinator, clock: FakeClock) -> None:
    outputs = {name: logits_for(seed) for seed, name in enumerate("abc")}
    for arrival, name in zip((0.0, 0.3, 1.0), "abc"):
        clock.now = arrival
        assert not coordinator.is_complete()
        coordinator.submit(frame(name, 0, outputs[name]))
    assert coordinator.waiting_for() == [] and coordinator.is_complete()
    replies = coordinator.compute()
    expected = mimicry_gradients(torch.stack([outputs[n] for n in "abc"]), alpha=2.0, temperature=2.0)
    for position, name in enumerate("abc"):
        assert torch.allclose(replies[name].grad, expected.grads[position] * 0.5 * 4)
        assert replies[name].mimicry_loss == pytest.approx(float(expected.losses[position]) * 0.5 * 4)
        assert replies[name].live_students == 3
    assert coordinator.step == 1
    waits = {record.student: record.wait_seconds for record in coordinator.records[0].values()}
    assert waits == pytest.approx({"a": 1.0, "b": 0.7, "c": 0.0})


def test_replies_survive_the_next_step_that_reuses_the_workspace(coordinator: CohortCoordinator) -> None:
    """The coordinator computes every step in the same buffers: a step's replies must not share them."""
    answered = []
    for step in range(2):
        for seed, name in enumerate("abc"):
            coordinator.submit(frame(name, step, logits_for(10 * step + seed)))
        replies = coordinator.compute()
        answered.append({name: reply.grad.clone() for name, reply in replies.items()})
        if step == 0:
            first = replies
    assert all(torch.equal(first[name].grad, answered[0][name]) for name in "abc")
    assert not torch.equal(answered[0]["a"], answered[1]["a"])


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"batch_hash": "0" * 16}, "batch hash"),
        ({"logits": torch.full((BATCH, CLASSES), float("nan"))}, "NaN"),
        ({"logits": torch.zeros(BATCH, CLASSES + 1)}, "expected 8×4"),
        ({"logits": torch.zeros(BATCH - 1, CLASSES)}, "expected 8×4"),
        ({"ce_loss": float("inf")}, "NaN or infinite"),
    ],
)
def test_bad_frame_is_rejected_without_blocking_peers(coordinator: CohortCoordinator, changes: dict, reason: str) -> None:
    coordinator.submit(frame("a", 0, logits_for(0)))
    with pytest.raises(FrameRejected, match=reason):
        coordinator.submit(frame("b", **{"logits": logits_for(1), **changes}))
    coordinator.submit(frame("c", 0, logits_for(2)))
    assert coordinator.is_complete()
    replies = coordinator.compute()
    assert sorted(replies) == ["a", "c"] and replies["a"].live_students == 2
    pair = mimicry_gradients(torch.stack([logits_for(0), logits_for(2)]), alpha=2.0, temperature=2.0)
    assert torch.allclose(replies["a"].grad, pair.grads[0] * 2.0)


def test_unknown_duplicate_and_mismatched_shapes(coordinator: CohortCoordinator) -> None:
    with pytest.raises(FrameRejected, match="unknown student 'z'"):
        coordinator.submit(frame("z", 0, logits_for(0)))
    coordinator.submit(frame("a", 0, logits_for(0)))
    with pytest.raises(FrameRejected, match="duplicate"):
        coordinator.submit(frame("a", 0, logits_for(0)))
    with pytest.raises(FrameRejected, match=r"shape \(7, 4\), expected 8×4"):
        coordinator.submit(frame("b", 0, logits_for(1, rows=BATCH - 1)))


def test_a_frame_for_another_step_is_refused_and_its_sender_still_expected(coordinator: CohortCoordinator) -> None:
    """A student ahead of the cohort (it missed a rollback) or a retried stale frame must resend, not be skipped."""
    coordinator.submit(frame("a", 0, logits_for(0)))
    for wrong in (1, 5):
        with pytest.raises(FrameRejected, match=f"is for step {wrong}, cohort is at step 0") as refused:
            coordinator.submit(frame("b", wrong, logits_for(1)))
        assert refused.value.reason == "wrong_step"
    assert coordinator.waiting_for() == ["b", "c"] and not coordinator.is_complete()
    coordinator.submit(frame("b", 0, logits_for(1)))
    coordinator.submit(frame("c", 0, logits_for(2)))
    assert sorted(coordinator.compute()) == ["a", "b", "c"]


def test_registration_must_agree(coordinator: CohortCoordinator) -> None:
    with pytest.raises(FrameRejected, match="num_train=21"):
        coordinator.register(StudentInfo("a", NUM_TRAIN + 1, 5, CLASSES, 3))
    with pytest.raises(FrameRejected, match="unknown student"):
        coordinator.register(StudentInfo("d", NUM_TRAIN, 5, CLASSES, 3))


def test_dead_student_is_not_waited_for(coordinator: CohortCoordinator) -> None:
    coordinator.submit(frame("a", 0, logits_for(0)))
    coordinator.submit(frame("b", 0, logits_for(1)))
    assert coordinator.waiting_for() == ["c"]
    coordinator.mark_dead("c")
    assert coordinator.is_complete() and sorted(coordinator.compute()) == ["a", "b"]
    with pytest.raises(FrameRejected, match="not a live member"):
        coordinator.submit(frame("c", 1, logits_for(2)))


def test_student_timings_attach_to_the_step_they_measure(coordinator: CohortCoordinator) -> None:
    for name in "abc":
        coordinator.submit(frame(name, 0, logits_for(0)))
    coordinator.compute()
    coordinator.submit(frame("a", 1, logits_for(0), previous=StepMeasures(0, compute_seconds=0.25, round_trip_seconds=0.5)))
    record = coordinator.records[0]["a"]
    assert (record.compute_seconds, record.round_trip_seconds) == (0.25, 0.5)
    assert [r.student for r in coordinator.pop_records(1)] == ["a", "b", "c"] and 0 not in coordinator.records


def test_every_value_a_student_measures_has_its_column_and_its_metric() -> None:
    """The one road of a measured value: a StepMeasures field is a StepRecord field (a column of the step log) and a
    histogram of the metrics; a new field fails here until it has both."""
    measured = set(StepMeasures(0, 0.0, 0.0).values())
    columns = {item.name: item for item in fields(StepRecord)}
    assert measured <= set(columns) and measured == set(MEASURE_METRICS)
    # a step log written before a measure existed reads it as absent: its column has a default (NaN)
    assert all(math.isnan(columns[name].default) for name in measured)


def test_a_students_measures_reach_its_step_record_and_its_histograms() -> None:
    config = parse_config({"students": [{"model": "mlp", "name": name} for name in "ab"], "training": {"batch_size": 8}})
    barrier = registered_barrier(config, num_train=20, classes=3, steps_per_epoch=3)
    for name in "ab":
        barrier.core.submit(planned_frame(name, 0, torch.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]], 8, num_train=20, steps_per_epoch=3))
    barrier.core.compute()
    barrier.record_measures("a", StepMeasures(0, compute_seconds=0.25, round_trip_seconds=0.0375))
    record = barrier.core.records[0]["a"]
    assert {name: getattr(record, name) for name in MEASURE_METRICS} == {"compute_seconds": 0.25, "round_trip_seconds": 0.0375}
    scraped = {(sample.name, sample.labels.get("student")): sample.value
               for family in text_string_to_metric_families(generate_latest(barrier.registry).decode()) for sample in family.samples}
    for measure, (metric, _, _) in MEASURE_METRICS.items():
        assert scraped[(f"{metric}_sum", "a")] == getattr(record, measure) and scraped[(f"{metric}_count", "a")] == 1.0
        assert (f"{metric}_count", "b") not in scraped  # b reported nothing


def test_epoch_scoring_uses_the_mean_of_probabilities(coordinator: CohortCoordinator) -> None:
    labels = torch.tensor([0, 1])
    # a is right on sample 0 only, b on sample 1 only; c is confidently wrong on both but less sure than a/b are right.
    outputs = {
        "a": torch.tensor([[9.0, 0, 0, 0], [0, 0, 1.0, 0]]),
        "b": torch.tensor([[0, 0, 1.0, 0], [0, 9.0, 0, 0]]),
        "c": torch.tensor([[0, 0, 0, 2.0], [0, 0, 0, 2.0]]),
    }
    results = [coordinator.submit_eval(EvalFrame(name, 0, outputs[name], labels)) for name in "abc"]
    assert results[:2] == [None, None]
    scored = results[2]
    assert scored.accuracy == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert scored.ensemble_accuracy == 1.0
    coordinator.submit_eval(EvalFrame("a", 1, outputs["a"], labels))
    with pytest.raises(FrameRejected, match="does not match"):
        coordinator.submit_eval(EvalFrame("b", 1, outputs["b"], torch.tensor([1, 1])))


def test_score_epoch_single_student() -> None:
    scored = score_epoch(3, [EvalFrame("a", 3, torch.eye(3), torch.tensor([0, 1, 1]))])
    assert scored.accuracy["a"] == pytest.approx(2 / 3) and scored.ensemble_accuracy == pytest.approx(2 / 3)


def test_state_snapshot(coordinator: CohortCoordinator) -> None:
    coordinator.submit(frame("b", 0, logits_for(0)))
    state = coordinator.state()
    assert state["step"] == 0 and state["live"] == ["a", "b", "c"] and state["waiting_for"] == ["a", "c"]
    assert state["members"] == ["a", "b", "c"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_every_nan_and_infinity_and_no_overflow_of_large_finite_logits(dtype: torch.dtype) -> None:
    from rdml_dist.finite import all_finite

    large = torch.full((128, 100), torch.finfo(dtype).max, dtype=dtype)  # their sum overflows the dtype itself
    assert all_finite(large) and all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        for row, column in ((0, 0), (127, 99), (64, 3)):
            poisoned = large.clone()
            poisoned[row, column] = bad
            assert not all_finite(poisoned) and not all_finite(poisoned.t()), (bad, row, column)  # a strided view too
