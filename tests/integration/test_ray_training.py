"""The Ray engine end to end on one local node: same trajectory as the in-process engine, many students, no fit."""

import math
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from rdml_dist.engines.local import train_local
from rdml_dist.engines.ray_engine import CohortDoesNotFit, train_ray
from rdml_dist.errors import ConfigError
from tests.integration.conftest import cohort_released, make_config, read_json, read_steps, wait_until

HETEROGENEOUS = [
    {"name": "mlp", "model": "mlp", "options": {"hidden": [128, 64]}},
    {"name": "cnn", "model": "small_cnn"},
    {"name": "resnet20", "model": "resnet20"},
]


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _by_step_and_student(rows: list[dict[str, str]]) -> dict[tuple[int, str], dict[str, str]]:
    keyed = {(int(row["step"]), row["student"]): row for row in rows}
    assert len(keyed) == len(rows), "a (step, student) pair appears twice in steps.csv"
    return keyed


SMALL_TRIO = [{"name": "mlp", "model": "mlp", "options": {"hidden": [32]}}, {"name": "cnn", "model": "small_cnn", "options": {"width": 8}},
              {"name": "wide", "model": "mlp", "options": {"hidden": [64]}}]


def assert_ray_reproduces_local(tmp_path: Path, students: list[dict], **sections: dict) -> dict[str, Any]:
    """Both engines train the same config; every per-step CE and mimicry loss agrees to 1e-4. Returns the
    Ray run's coordinator placement (where its servers listened)."""
    threads = torch.get_num_threads()
    try:
        local_run = train_local(make_config(tmp_path / "local", students, **sections), tmp_path / "local", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    local_run.finish()
    ray_run = train_ray(make_config(tmp_path / "ray", students, **sections), tmp_path / "ray", show_progress=False)
    ray_run.finish()
    local_steps, ray_steps = (_by_step_and_student(read_steps(tmp_path / run)) for run in ("local", "ray"))
    assert ray_steps.keys() == local_steps.keys() and len(ray_steps) == len(students) * 2 * 6
    for key, local_row in local_steps.items():
        for column in ("ce_loss", "mimicry_loss"):
            assert float(ray_steps[key][column]) == pytest.approx(float(local_row[column]), abs=1e-4, rel=0), (key, column)
    return read_json(tmp_path / "ray" / "placements.json")["coordinator"]


@pytest.mark.timeout(180)
def test_sequential_updates_on_ray_reproduce_the_in_process_engine(tmp_path: Path) -> None:
    """DML Algorithm 1 across processes: each turn's gradient waits for the previous student's refreshed logits."""
    assert_ray_reproduces_local(tmp_path, SMALL_TRIO, training={"epochs": 2, "batch_size": 256}, mimicry={"update": "sequential"})


@pytest.mark.timeout(180)
def test_actor_call_exchange_on_ray_reproduces_the_in_process_engine(tmp_path: Path) -> None:
    """The other transport: one Ray actor call per step instead of the frame lane (the default, tested below)."""
    coordinator = assert_ray_reproduces_local(tmp_path, SMALL_TRIO, training={"epochs": 2, "batch_size": 256},
                                              runtime={"exchange": {"transport": "actor_calls"}})
    assert coordinator["lane"] is None


@pytest.mark.timeout(180)
def test_half_precision_frames_on_ray_reproduce_the_in_process_engine(tmp_path: Path) -> None:
    """bfloat16 logits and gradients on the wire: the Ray students round exactly where the local ones do."""
    coordinator = assert_ray_reproduces_local(tmp_path, SMALL_TRIO, training={"epochs": 2, "batch_size": 256},
                                              runtime={"exchange": {"dtype": "bfloat16"}})
    assert coordinator["lane"].startswith("127.0.0.1:")  # the default transport: the frame lane, on loopback


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("transport", "update"), [("tcp", "simultaneous"), ("actor_calls", "simultaneous"), ("tcp", "sequential")])
def test_two_coordinator_shards_reproduce_the_in_process_engine(tmp_path: Path, transport: str, update: str) -> None:
    """Each shard serves half of every batch's rows; the students join the halves, the driver the records."""
    coordinator = assert_ray_reproduces_local(
        tmp_path, SMALL_TRIO, training={"epochs": 2, "batch_size": 256}, mimicry={"update": update},
        runtime={"exchange": {"transport": transport}, "coordinator": {"shards": 2, "cpus": 0.5}},
    )
    shards = coordinator["shards"]
    assert len(shards) == 2 and shards[0]["pid"] == coordinator["pid"] and shards[1]["pid"] != coordinator["pid"]
    assert [shard["lane"] is not None for shard in shards] == [transport == "tcp"] * 2
    rows = _by_step_and_student(read_steps(tmp_path / "ray"))
    assert rows[(0, "mlp")]["rows"] == "256"  # the shards' records are joined, not listed twice


@pytest.mark.timeout(180)
def test_ray_engine_reproduces_the_in_process_engine(tmp_path: Path) -> None:
    config = make_config(tmp_path / "ray", HETEROGENEOUS, training={"epochs": 2})
    threads = torch.get_num_threads()
    try:
        local_run = train_local(make_config(tmp_path / "local", HETEROGENEOUS, training={"epochs": 2}), tmp_path / "local", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    local_run.finish()
    ray_run = train_ray(config, tmp_path / "ray", show_progress=False)
    ray_run.finish()

    local_steps = _by_step_and_student(read_steps(tmp_path / "local"))
    ray_steps = _by_step_and_student(read_steps(tmp_path / "ray"))
    steps_per_epoch = math.ceil(round(1797 * 0.8) / 64)  # digits: 1,797 images, 20 % held out
    assert len(ray_steps) == 3 * 2 * steps_per_epoch
    assert ray_steps.keys() == local_steps.keys()
    for key, local_row in local_steps.items():
        ray_row = ray_steps[key]
        for column in ("ce_loss", "mimicry_loss"):
            assert float(ray_row[column]) == pytest.approx(float(local_row[column]), abs=1e-4, rel=0), (key, column)
        assert ray_row["correct"] == local_row["correct"], key
    # The mimicry term was really exchanged (non-zero) and training moved the losses.
    assert all(float(row["mimicry_loss"]) > 0 for row in ray_steps.values())
    for student in ("mlp", "cnn", "resnet20"):
        first, last = ray_steps[(0, student)], ray_steps[(2 * steps_per_epoch - 1, student)]
        assert float(last["ce_loss"]) < float(first["ce_loss"]), student

    local_results = read_json(tmp_path / "local" / "results.json")
    ray_results = read_json(tmp_path / "ray" / "results.json")
    assert (local_results["engine"], ray_results["engine"]) == ("local", "ray")
    assert len(ray_results["epochs"]) == 2
    for name in ("mlp", "cnn", "resnet20", "ensemble"):
        assert ray_results["summary"][name]["final_val_accuracy"] == local_results["summary"][name]["final_val_accuracy"], name
    for local_epoch, ray_epoch in zip(local_results["epochs"], ray_results["epochs"]):
        assert ray_epoch["ensemble_val_accuracy"] == local_epoch["ensemble_val_accuracy"]
        for name in ("mlp", "cnn", "resnet20"):
            assert ray_epoch["students"][name]["val_accuracy"] == local_epoch["students"][name]["val_accuracy"]
    assert ray_results["summary"]["ensemble"]["final_val_accuracy"] > 0.5  # far above chance (0.1) after 2 epochs
    # The final cohort checkpoint exists and holds the same weights as the in-process run's.
    final = f"checkpoints/step-{2 * steps_per_epoch:08d}"
    for name in ("mlp", "cnn", "resnet20"):
        ray_state = torch.load(tmp_path / "ray" / final / f"{name}.pt", weights_only=True)
        local_state = torch.load(tmp_path / "local" / final / f"{name}.pt", weights_only=True)
        assert ray_state["epoch"] == local_state["epoch"] == 2
        for key, tensor in local_state["model"].items():
            torch.testing.assert_close(ray_state["model"][key], tensor, atol=1e-4, rtol=0)
    placements = read_json(tmp_path / "ray" / "placements.json")["students"]
    assert set(placements) == {"mlp", "cnn", "resnet20"}
    assert len({placement["pid"] for placement in placements.values()}) == 3  # one process per student
    assert all(placement["device"] == "cpu" and placement["gpu_ids"] == [] for placement in placements.values())


@pytest.mark.timeout(240)
def test_cohort_of_eight_fractional_cpu_students_completes(tmp_path: Path) -> None:
    students = [{"name": f"s{index}", "model": "mlp" if index % 2 else "small_cnn"} for index in range(8)]
    config = make_config(tmp_path, students, training={"batch_size": 512}, ray={"cpus_per_student": 0.25})
    run = train_ray(config, tmp_path, show_progress=False)
    run.finish()

    steps_per_epoch = math.ceil(round(1797 * 0.8) / 512)
    rows = read_steps(tmp_path)
    names = [f"s{index}" for index in range(8)]
    assert sorted((int(row["step"]), row["student"]) for row in rows) == sorted(
        (step, name) for step in range(steps_per_epoch) for name in names
    )
    assert all(math.isfinite(float(row["ce_loss"])) and float(row["mimicry_loss"]) > 0 for row in rows)
    results = read_json(tmp_path / "results.json")
    assert set(results["epochs"][0]["students"]) == set(names)
    assert all(0 <= results["summary"][name]["final_val_accuracy"] <= 1 for name in names)
    assert len({placement["pid"] for placement in read_json(tmp_path / "placements.json")["students"].values()}) == 8
    wait_until(cohort_released, "the cohort's placement group and CPUs are released")


@pytest.mark.timeout(60)
def test_cohort_that_cannot_fit_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    config = make_config(tmp_path, HETEROGENEOUS, ray={"gpus_per_student": 1, "placement_timeout_s": 3})
    started = time.monotonic()
    with pytest.raises(CohortDoesNotFit) as error:
        train_ray(config, tmp_path / "run", show_progress=False)
    assert time.monotonic() - started < 20
    message = str(error.value)
    assert "PACK" in message and "'GPU': 1.0" in message and "'CPU': 1.0" in message and "3 students" in message
    assert not (tmp_path / "run" / "results.json").exists()
    # The failed reservation is given back: nothing stays pending on the cluster.
    wait_until(cohort_released, "the failed reservation is removed")


@pytest.mark.timeout(90)
def test_a_student_that_cannot_start_fails_the_run_and_releases_the_cohort(tmp_path: Path) -> None:
    # parse_config checks types only, so the unknown model is first met inside the student actor.
    students = [{"name": "good", "model": "mlp"}, {"name": "bad", "model": "no_such_model"}]
    config = make_config(tmp_path, students)
    with pytest.raises(ConfigError) as error:  # the user's mistake reaches the driver as itself: one line in the CLI
        train_ray(config, tmp_path / "run", show_progress=False)
    assert error.value.field == "students.1.model" and "no_such_model" in error.value.problem
    # The placement group and the actors already started are given back, so the shared session stays usable.
    wait_until(cohort_released, "the started cohort is released")
