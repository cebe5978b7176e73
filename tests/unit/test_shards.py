"""Coordinator shards: each serves its rows, and the joined answers equal one coordinator's."""

import pytest
import torch

from rdml_dist.config import ConfigError, parse_config
from rdml_dist.coordinator_core.coordinator import CohortCoordinator
from rdml_dist.messages import NON_FINITE, StudentInfo
from rdml_dist.errors import FrameRejected
from rdml_dist.coordinator_core.shards import join_replies, merge_records, shard_rows, split_frame
from tests.unit.test_coordinator import BATCH, CLASSES, NUM_TRAIN, frame

NAMES = ("a", "b", "c")


def _cores(shards: int, **mimicry: object) -> list[CohortCoordinator]:
    config = parse_config({
        "students": [{"model": "mlp", "name": name} for name in NAMES],
        "training": {"batch_size": BATCH, "epochs": 2},
        "mimicry": {"alpha": 2.0, "temperature": 2.0, "weight": 0.5, **mimicry},
    })
    cores = [CohortCoordinator(config, shard=index, shards=shards) for index in range(shards)]
    for core in cores:
        for name in NAMES:
            core.register(StudentInfo(name, NUM_TRAIN, 5, CLASSES, steps_per_epoch=3))
    return cores


def _step(cores: list[CohortCoordinator], step: int, seed: int) -> dict[str, object]:
    """Every student splits its frame over the shards; returns each student's joined reply."""
    generator = torch.Generator().manual_seed(seed)
    rows = cores[0].expected_batch(step)[1]
    per_shard: dict[str, list[object]] = {name: [] for name in NAMES}
    frames = {name: frame(name, step, torch.randn(rows, CLASSES, generator=generator) * 4) for name in NAMES}
    for core_index, core in enumerate(cores):
        for name in NAMES:
            core.submit(split_frame(frames[name], len(cores))[core_index])
        for name, reply in core.compute().items():
            per_shard[name].append(reply)
    return {name: join_replies(replies) for name, replies in per_shard.items()}


def test_rows_are_split_contiguously_and_completely() -> None:
    for rows in (1, 7, 8, 30, 128):
        for shards in (1, 2, 3, 4):
            slices = [shard_rows(rows, shards, index) for index in range(shards)]
            assert [index for piece in slices for index in range(rows)[piece]] == list(range(rows))
            sizes = [piece.stop - piece.start for piece in slices]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="shard index 2 is outside 0..1"):
        shard_rows(8, 2, 2)


@pytest.mark.parametrize("shards", [2, 3, 5])  # 5: the last batch (4 rows) leaves a shard without rows
@pytest.mark.parametrize("mimicry", [{}, {"mode": "ensemble"}, {"divergence": "js"}])
def test_sharded_replies_and_records_equal_one_coordinators(shards: int, mimicry: dict[str, object]) -> None:
    single, sharded = _cores(1, **mimicry), _cores(shards, **mimicry)
    for step in range(3):
        expected, joined = _step(single, step, seed=step), _step(sharded, step, seed=step)
        for name in NAMES:
            assert torch.allclose(joined[name].grad, expected[name].grad, rtol=1e-5, atol=1e-7), (step, name)
            assert joined[name].mimicry_loss == pytest.approx(expected[name].mimicry_loss, rel=1e-5)
    records = merge_records([core.pop_records(3) for core in sharded])
    reference = single[0].pop_records(3)
    assert [(r.step, r.student, r.rows) for r in records] == [(r.step, r.student, r.rows) for r in reference]
    for record, expected_record in zip(records, reference):
        assert record.mimicry_loss == pytest.approx(expected_record.mimicry_loss, rel=1e-5)
        assert record.divergence == pytest.approx(expected_record.divergence, rel=1e-5)
        assert record.ce_loss == expected_record.ce_loss and record.correct == expected_record.correct


def test_a_shard_refuses_a_frame_with_other_rows_than_its_own() -> None:
    second = _cores(2)[1]
    with pytest.raises(Exception, match=f"expected {BATCH - BATCH // 2}×{CLASSES}"):
        second.submit(frame("a", 0, torch.zeros(BATCH, CLASSES)))  # the whole batch, not shard 1's half


def test_shards_are_refused_where_they_cannot_work() -> None:
    students = [{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "b", "external": True}]
    with pytest.raises(ConfigError, match="external students \\(b\\) join one coordinator"):
        parse_config({"students": students, "rpc": {"enabled": True, "port": 50151},
                      "runtime": {"coordinator": {"shards": 2}}})
    with pytest.raises(ConfigError, match="shards: 9 is more than training.batch_size \\(8\\)"):
        parse_config({"students": [{"model": "mlp"}] * 2, "training": {"batch_size": 8}, "runtime": {"coordinator": {"shards": 9}}})


def test_a_frame_non_finite_in_one_shards_rows_is_refused_by_every_shard() -> None:
    cores = _cores(2)
    logits = torch.randn(BATCH, CLASSES)
    logits[-1, 0] = float("inf")  # a row of the second shard only
    parts = split_frame(frame("a", 0, logits), 2)
    for core, part in zip(cores, parts):
        with pytest.raises(FrameRejected) as refused:
            core.submit(part)
        assert refused.value.reason == NON_FINITE
        for name in ("b", "c"):
            core.submit(split_frame(frame(name, 0, torch.randn(BATCH, CLASSES)), 2)[cores.index(core)])
        assert set(core.compute()) == {"b", "c"}  # the peers' step went on without it, on both shards alike
    records = merge_records([core.pop_records(1) for core in cores])
    assert sorted(record.student for record in records) == ["b", "c"] and all(record.rows == BATCH for record in records)


def test_a_record_missing_on_some_shard_is_left_out() -> None:
    """A student that died between sending its parts: one coordinator would have no record of that step."""
    cores = _cores(2)
    for index, core in enumerate(cores):
        names = NAMES if index == 0 else ("b", "c")  # 'a' reached the first shard only
        for name in names:
            core.submit(split_frame(frame(name, 0, torch.randn(BATCH, CLASSES)), 2)[index])
        if index == 1:
            core.mark_dead("a")
        core.compute()
    records = merge_records([core.pop_records(1) for core in cores])
    assert sorted(record.student for record in records) == ["b", "c"]
