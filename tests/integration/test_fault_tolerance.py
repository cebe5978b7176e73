"""Failures survived for real: student and coordinator processes SIGKILLed mid-epoch under each policy.

Every run trains the same two-student cohort (2 epochs of 12 steps, a checkpoint every 4 steps,
one torch thread per student, so the CPU trajectory is deterministic) and is compared with an
undisturbed run of the same seed.
"""

import math
import os
import signal
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from rdml_dist.engines.failure_policy import RunFailed
from rdml_dist.engines.ray_actors import STORAGE_MARKER, StudentActor
from rdml_dist.engines.ray_engine import train_ray
from rdml_dist.errors import StudentRestarted
from rdml_dist.run_records.run_directory import RunDirectory
from rdml_dist.run_records.storage import Storage
from tests.integration.cli_process import kill_actor_process
from tests.integration.conftest import cohort_released, make_config, read_json, read_steps, wait_until

STUDENTS = [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}]
STEPS_PER_EPOCH = math.ceil(round(1797 * 0.8) / 128)  # 12
EPOCHS = 2
CONTINUE_TOLERANCE = 0.10  # absolute accuracy: a `continue` student lost the steps since its checkpoint


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _config(run_dir: Path, **fault: Any) -> Any:
    return make_config(
        run_dir,
        STUDENTS,
        training={"epochs": EPOCHS, "batch_size": 128},
        runtime={"checkpoint": {"every_steps": 4, "keep": 2}, "fault": {"max_failures": 3, **fault}},
        ray={"exchange_timeout_s": 60},
    )


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("undisturbed")
    train_ray(_config(run_dir), run_dir, show_progress=False).finish()
    return run_dir


class Background:
    """``train_ray`` on a thread of this process, so the test can kill the cohort's processes meanwhile."""

    def __init__(self, config: Any, run_dir: Path) -> None:
        self.run: RunDirectory | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, args=(config, run_dir), daemon=True)
        self.thread.start()

    def _train(self, config: Any, run_dir: Path) -> None:
        try:
            self.run = train_ray(config, run_dir, show_progress=False)
            self.run.finish()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.error = error
            traceback.print_exc()  # shown by pytest with the failing test

    def join(self, timeout_s: float = 240) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"training did not finish within {timeout_s} s"


def _kill_after_checkpoint(run_dir: Path, step: int, who: str) -> int:
    """Once the checkpoint of ``step`` is complete, SIGKILL a student (by name) or the coordinator; returns its pid."""
    wait_until(lambda: (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists(), f"checkpoint {step}", 120)
    placements = read_json(run_dir / "placements.json")
    pid = placements["coordinator"]["pid"] if who == "coordinator" else placements["students"][who]["pid"]
    assert kill_actor_process(pid, "Coordinator" if who == "coordinator" else "StudentActor"), f"{who} is not running"
    return pid


def _final_weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    final = run_dir / "checkpoints" / f"step-{EPOCHS * STEPS_PER_EPOCH:08d}" / f"{name}.pt"
    return torch.load(final, weights_only=True)["model"]


def _assert_every_step_once(run_dir: Path) -> None:
    rows = read_steps(run_dir)
    keys = sorted((int(row["step"]), row["student"]) for row in rows)
    assert keys == sorted((step, name["name"]) for step in range(EPOCHS * STEPS_PER_EPOCH) for name in STUDENTS)


def _accuracies(run_dir: Path) -> dict[str, list[float]]:
    epochs = read_json(run_dir / "results.json")["epochs"]
    names = [student["name"] for student in STUDENTS]
    return {**{name: [entry["students"][name]["val_accuracy"] for entry in epochs] for name in names},
            "ensemble": [entry["ensemble_val_accuracy"] for entry in epochs]}


def _assert_same_as(run_dir: Path, undisturbed: Path) -> None:
    """The run followed the undisturbed trajectory exactly: step losses, accuracies, final weights."""
    _assert_every_step_once(run_dir)
    expected = {(row["step"], row["student"]): row for row in read_steps(undisturbed)}
    for row in read_steps(run_dir):
        reference = expected[(row["step"], row["student"])]
        for column in ("ce_loss", "mimicry_loss", "correct"):
            assert row[column] == reference[column], (row["step"], row["student"], column)
    assert _accuracies(run_dir) == _accuracies(undisturbed)
    for student in STUDENTS:
        for key, tensor in _final_weights(undisturbed, student["name"]).items():
            assert torch.equal(_final_weights(run_dir, student["name"])[key], tensor), (student["name"], key)


@pytest.mark.timeout(300)
def test_killed_student_rolls_the_cohort_back_and_the_run_is_unchanged(undisturbed: Path, tmp_path: Path) -> None:
    background = Background(_config(tmp_path), tmp_path)
    killed = _kill_after_checkpoint(tmp_path, 8, "cnn")
    background.join()
    assert background.error is None, background.error

    _assert_same_as(tmp_path, undisturbed)
    faults = read_json(tmp_path / "results.json")["faults"]
    assert faults["counts"] == {"student_died": 1}
    (event,) = faults["events"]
    assert event["student"] == "cnn" and event["action"].startswith("rolled back to step ")
    assert read_json(tmp_path / "placements.json")["students"]["cnn"]["pid"] != killed  # Ray restarted it
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(300)
def test_killed_student_under_continue_rejoins_while_the_others_go_on(undisturbed: Path, tmp_path: Path) -> None:
    background = Background(_config(tmp_path, on_student_failure="continue"), tmp_path)
    killed = _kill_after_checkpoint(tmp_path, 4, "mlp")
    background.join()
    assert background.error is None, background.error

    events = read_json(tmp_path / "results.json")["faults"]["events"]
    assert [(event["kind"], event["student"], event["action"]) for event in events] == [
        ("student_died", "mlp", "the live students went on")
    ]
    rows = read_steps(tmp_path)
    cnn_steps = sorted(int(row["step"]) for row in rows if row["student"] == "cnn")
    assert cnn_steps == list(range(EPOCHS * STEPS_PER_EPOCH))  # the live student never stopped
    mlp_steps = {int(row["step"]) for row in rows if row["student"] == "mlp"}
    assert set(range(STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH)) <= mlp_steps  # it rejoined and trained the last epoch
    assert read_json(tmp_path / "placements.json")["students"]["mlp"]["pid"] != killed  # as a restarted process
    accuracies, reference = _accuracies(tmp_path), _accuracies(undisturbed)
    for name, values in accuracies.items():
        assert all(value is not None for value in values), name  # every student evaluated every epoch
        assert abs(values[-1] - reference[name][-1]) <= CONTINUE_TOLERANCE, (name, values, reference[name])
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("during", "step"), [("checkpoint", 4), ("evaluation", STEPS_PER_EPOCH)])
def test_a_student_dying_outside_the_steps_under_continue_rejoins_and_is_called_again(
    undisturbed: Path, tmp_path: Path, during: str, step: int
) -> None:
    marker = tmp_path / "died"
    dying = {"name": "mlp", "model": "tests.integration.dying_models:mlp_that_dies_once",
             "options": {"marker": str(marker), "during": during, "after_steps": step}}
    config = make_config(tmp_path, [dying, STUDENTS[1]], training={"epochs": EPOCHS, "batch_size": 128},
                         runtime={"checkpoint": {"every_steps": 4, "keep": 2}, "fault": {"on_student_failure": "continue"}},
                         ray={"exchange_timeout_s": 60})
    train_ray(config, tmp_path, show_progress=False).finish()

    killed = int(marker.read_text())  # the process that died while writing its checkpoint or scoring the epoch
    events = read_json(tmp_path / "results.json")["faults"]["events"]
    assert [(event["kind"], event["student"], event["step"], event["action"]) for event in events] == [
        ("student_died", "mlp", step, "the live students went on")
    ]
    _assert_every_step_once(tmp_path)  # the restarted student was restored and took every later step
    assert read_json(tmp_path / "placements.json")["students"]["mlp"]["pid"] != killed
    accuracies, reference = _accuracies(tmp_path), _accuracies(undisturbed)
    for name, values in accuracies.items():
        assert all(value is not None for value in values), name  # the epoch was scored with the restarted student
        assert abs(values[-1] - reference[name][-1]) <= CONTINUE_TOLERANCE, (name, values, reference[name])
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(120)
def test_a_restarted_student_refuses_work_until_it_is_restored(tmp_path: Path) -> None:
    """Ray hands a call made after a death to the restarted process: it must not train a fresh model silently."""
    storage = Storage(str(tmp_path))
    storage.write_bytes(STORAGE_MARKER, b"marker")
    config = _config(tmp_path)
    actor = StudentActor.options(max_restarts=-1, num_cpus=0).remote(config.model_dump(mode="json"), 0, 1, storage.url, "marker")
    try:
        ray.get(actor.save_checkpoint.remote(0))  # the first process works from the start
        first = ray.get(actor.placement.remote())["pid"]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: _restarted_pid(actor) not in (None, first), "Ray restarts the student", 60)
        with pytest.raises(ray.exceptions.RayTaskError) as refused:
            ray.get(actor.save_checkpoint.remote(4))
        assert isinstance(refused.value.cause, StudentRestarted) and "'mlp' was restarted" in str(refused.value.cause)
        assert not (tmp_path / "checkpoints" / f"step-{4:08d}").exists()  # nothing written by the fresh model
        ray.get(actor.restore.remote(0, 0))
        assert ray.get(actor.save_checkpoint.remote(4)).endswith("mlp.pt")  # restored: it works again
    finally:
        ray.kill(actor, no_restart=True)


def _restarted_pid(actor: Any) -> int | None:
    try:
        return ray.get(actor.placement.remote(), timeout=10)["pid"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["restart_cohort", "continue"])
def test_killed_coordinator_is_restarted_and_the_run_is_unchanged(undisturbed: Path, tmp_path: Path, policy: str) -> None:
    background = Background(_config(tmp_path, on_student_failure=policy), tmp_path)
    killed = _kill_after_checkpoint(tmp_path, 4, "coordinator")
    background.join()
    assert background.error is None, background.error

    _assert_same_as(tmp_path, undisturbed)
    events = read_json(tmp_path / "results.json")["faults"]["events"]
    assert [event["kind"] for event in events] == ["coordinator_died"]
    assert read_json(tmp_path / "placements.json")["coordinator"]["pid"] != killed
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(300)
def test_a_killed_coordinator_shard_is_restarted_and_the_run_follows_the_same_trajectory(undisturbed: Path, tmp_path: Path) -> None:
    config = _config(tmp_path)
    config = config.model_copy(update={"runtime": config.runtime.model_copy(update={
        "coordinator": config.runtime.coordinator.model_copy(update={"shards": 2})})})
    background = Background(config, tmp_path)
    wait_until(lambda: (tmp_path / "checkpoints" / f"step-{4:08d}" / "manifest.json").exists(), "checkpoint 4", 120)
    killed = read_json(tmp_path / "placements.json")["coordinator"]["shards"][1]["pid"]
    assert kill_actor_process(killed, "Coordinator"), "the coordinator shard is not running"
    background.join()
    assert background.error is None, background.error

    events = read_json(tmp_path / "results.json")["faults"]["events"]
    assert [event["kind"] for event in events] == ["coordinator_died"]
    assert read_json(tmp_path / "placements.json")["coordinator"]["shards"][1]["pid"] != killed
    _assert_every_step_once(tmp_path)
    expected = {(row["step"], row["student"]): row for row in read_steps(undisturbed)}
    for row in read_steps(tmp_path):  # the same trajectory as one coordinator, up to the rounding of the split
        for column in ("ce_loss", "mimicry_loss"):
            assert float(row[column]) == pytest.approx(float(expected[(row["step"], row["student"])][column]), abs=1e-4)
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", ["cnn", "coordinator"])
def test_a_kill_under_fail_stops_the_run_naming_what_died_where_and_why(tmp_path: Path, victim: str) -> None:
    background = Background(_config(tmp_path, on_student_failure="fail"), tmp_path)
    _kill_after_checkpoint(tmp_path, 4, victim)
    background.join()
    assert isinstance(background.error, RunFailed), background.error
    message = str(background.error)
    if victim == "coordinator":
        assert "the coordinator died at step" in message and "ActorDiedError" in message
    else:
        node = read_json(tmp_path / "placements.json")["students"]["cnn"]["node_id"]
        assert f"student 'cnn' on node {node} died at step" in message and "ActorDiedError" in message
    wait_until(cohort_released, "the cohort is released")


@pytest.mark.timeout(300)
def test_a_run_that_keeps_failing_ends_with_every_cause(tmp_path: Path) -> None:
    background = Background(_config(tmp_path, max_failures=1), tmp_path)
    _kill_after_checkpoint(tmp_path, 4, "cnn")
    wait_until(lambda: _fault_counts(tmp_path).get("student_died") == 1, "the first failure is recorded", 120)
    assert kill_actor_process(read_json(tmp_path / "placements.json")["students"]["mlp"]["pid"], "StudentActor")
    background.join()
    assert isinstance(background.error, RunFailed), background.error
    message = str(background.error)
    assert "2 failures, more than runtime.fault.max_failures=1" in message
    assert "1. student 'cnn'" in message and "2. student 'mlp'" in message
    wait_until(cohort_released, "the cohort is released")


def _fault_counts(run_dir: Path) -> dict[str, int]:
    return read_json(run_dir / "results.json")["faults"]["counts"] if (run_dir / "results.json").exists() else {}


def test_every_process_of_a_run_stops_with_it(undisturbed: Path) -> None:
    placements = read_json(undisturbed / "placements.json")
    pids = [placement["pid"] for placement in placements["students"].values()] + [placements["coordinator"]["pid"]]
    assert len(set(pids)) == 3  # coordinator and each student in a process of its own
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "the run's actor processes exit")
    wait_until(cohort_released, "the cohort is released")
