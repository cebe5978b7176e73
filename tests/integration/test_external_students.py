"""A cohort that mixes Ray students with a student in its own process, joined over gRPC, as users run it.

The driver (``rdml-dist train``) and the external student (``rdml-dist student``) are real child
processes; the driver starts its own local Ray. The mixed cohort must follow the same
trajectory as the in-process engine on the same config, and ``rdml-dist status`` must show it.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rdml_dist.config import load_config
from rdml_dist.engines.local import train_local
from tests.integration.cli_process import RDML_DIST, child_environment, free_port, kill_actor_process, run_cli, write_config
from tests.integration.conftest import read_json, read_steps, wait_until

STUDENTS = [
    {"name": "mlp", "model": "mlp"},
    {"name": "cnn", "model": "small_cnn"},
    {"name": "outside", "model": "mlp", "options": {"hidden": [64]}, "external": True},
]
TOKEN = "cohort-token"


def _start(args: list[str], cwd: Path, log: Path, **environment: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*RDML_DIST, *args], cwd=cwd, env=child_environment(**environment), text=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen[str], log: Path, timeout_s: float) -> str:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"{process.args} did not finish within {timeout_s} s:\n{log.read_text()}") from None
    return log.read_text()


@contextlib.contextmanager
def _stopped_at_the_end(*processes: subprocess.Popen[str]) -> Iterator[None]:
    """Whatever happens in the block, no process of the test outlives it."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def _mixed_config(tmp_path: Path, port: int, **rpc: Any) -> Path:
    path = write_config(tmp_path / "cohort.yaml", tmp_path / "run", training={"epochs": 2},
                        rpc={"port": port, "join_timeout_s": 120, **rpc})
    raw = yaml.safe_load(path.read_text())
    raw["students"] = STUDENTS
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_in_process_trajectory(config_path: Path, run_dir: Path, local_dir: Path, steps: int) -> None:
    """The same cohort trained in one process, every student local, took the run's per-step losses (to 1e-5)."""
    local_config = load_config(config_path, ["students.2.external=false", f"runtime.run_dir={local_dir}"])
    threads = torch.get_num_threads()
    try:
        train_local(local_config, local_dir, show_progress=False).finish()
    finally:
        torch.set_num_threads(threads)
    distributed = {(int(row["step"]), row["student"]): row for row in read_steps(run_dir)}
    local = {(int(row["step"]), row["student"]): row for row in read_steps(local_dir)}
    assert distributed.keys() == local.keys() and len(distributed) == 3 * steps
    for key, row in local.items():
        for column in ("ce_loss", "mimicry_loss"):
            assert float(distributed[key][column]) == pytest.approx(float(row[column]), abs=1e-5, rel=1e-5), (key, column)


@pytest.mark.timeout(420)
def test_ray_students_and_an_external_process_train_as_the_in_process_engine_would(tmp_path: Path) -> None:
    port = free_port()
    config_path = _mixed_config(tmp_path, port)
    address = f"127.0.0.1:{port}"
    driver = _start(["train", str(config_path), "--no-progress"], tmp_path, tmp_path / "driver.log", RDML_RPC_TOKEN=TOKEN)
    with _stopped_at_the_end(driver):
        # The driver waits for the external student: a live cohort, still forming, that status can show.
        def shown() -> bool:
            status = run_cli(["status", "--coordinator", address, "--token", TOKEN], tmp_path, 60)
            shown.output = status.stdout  # type: ignore[attr-defined]
            return status.returncode == 0 and "step 0/12" in status.stdout  # the Ray students have registered

        wait_until(shown, "rdml-dist status to show the forming cohort", 120)
        output = shown.output  # type: ignore[attr-defined]
        assert "cohort cli: forming, step 0/12" in output
        assert [line.split()[:4] for line in output.splitlines()[2:5]] == [
            ["mlp", "mlp", "ray", "yes"], ["cnn", "small_cnn", "ray", "yes"], ["outside", "mlp", "external", "no"],
        ]
        external = _start(["student", str(config_path), "--coordinator", address, "--name", "outside"], tmp_path,
                          tmp_path / "external.log", RDML_RPC_TOKEN=TOKEN)
        external_log = _finish(external, tmp_path / "external.log", 300)
        driver_log = _finish(driver, tmp_path / "driver.log", 120)
    assert external.returncode == 0, external_log
    assert "student outside finished at step 12 (2 evaluations, 0 rejoins" in external_log
    assert driver.returncode == 0, driver_log
    assert f"cohort service (gRPC) at {address}" in driver_log

    _assert_in_process_trajectory(config_path, tmp_path / "run", tmp_path / "local", steps=12)
    results = read_json(tmp_path / "run" / "results.json")
    local_results = read_json(tmp_path / "local" / "results.json")
    for epoch, local_epoch in zip(results["epochs"], local_results["epochs"], strict=True):
        assert sorted(epoch["students"]) == ["cnn", "mlp", "outside"]
        for name in ("mlp", "cnn", "outside"):
            assert epoch["students"][name]["val_accuracy"] == local_epoch["students"][name]["val_accuracy"], name
    assert read_json(tmp_path / "run" / "placements.json")["students"]["outside"] == {"external": True, "coordinator": address}


@pytest.mark.timeout(180)
def test_an_external_student_that_never_joins_fails_the_run_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    config_path = _mixed_config(tmp_path, port, join_timeout_s=3)
    started = time.monotonic()
    result = run_cli(["train", str(config_path), "--no-progress"], tmp_path, 150)
    assert result.returncode == 1
    assert (f"rdml-dist: external student(s) outside did not join the cohort service at 127.0.0.1:{port} within 3 s "
            "(rpc.join_timeout_s)") in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 120


def test_an_external_student_needs_a_fixed_port_and_the_ray_engine(tmp_path: Path) -> None:
    config_path = _mixed_config(tmp_path, 0)
    refused = run_cli(["validate", str(config_path)], tmp_path, 60)
    assert refused.returncode == 2 and "external students need the cohort service at a fixed address" in refused.stderr
    local = run_cli(["train", str(_mixed_config(tmp_path, free_port())), "--engine", "local", "--no-progress"], tmp_path, 120)
    assert local.returncode == 2 and "students.2.external: external students join a Ray-engine cohort over gRPC" in local.stderr
    wrong = run_cli(["student", str(config_path.with_name("cohort.yaml")), "--coordinator", "127.0.0.1:1", "--name", "mlp"],
                    tmp_path, 60)
    assert wrong.returncode == 2 and "students.0.external: student 'mlp' runs as a Ray actor" in wrong.stderr


def _kill_after_checkpoint(run_dir: Path, step: int, who: str) -> None:
    """Once the cohort checkpoint of ``step`` is complete, SIGKILL a Ray student (by name) or the coordinator."""
    wait_until(lambda: (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists(), f"checkpoint {step}", 180)
    _kill(run_dir, who)


def _kill(run_dir: Path, who: str) -> None:
    """SIGKILL a Ray student (by name) or the coordinator, as ``placements.json`` names its process."""
    placements = read_json(run_dir / "placements.json")
    pid = placements["coordinator"]["pid"] if who == "coordinator" else placements["students"][who]["pid"]
    assert kill_actor_process(pid, "Coordinator" if who == "coordinator" else "StudentActor"), f"{who} is not running"


@pytest.mark.timeout(480)
def test_an_external_student_follows_a_rollback_and_a_coordinator_restart(tmp_path: Path) -> None:
    """A Ray student dies (the cohort rolls back), then the coordinator dies (Ray restarts it on the same port).

    The external student restores its own snapshot each time and the run stays on the undisturbed trajectory.
    mlp holds the cohort for each kill (a whole run takes a few seconds: a kill after a checkpoint's file appears
    could come after the external student had finished, which then never rejoins the restarted coordinator).
    """
    port = free_port()
    config_path = _mixed_config(tmp_path, port)
    raw = yaml.safe_load(config_path.read_text())
    raw["training"]["batch_size"] = 128  # 12 steps per epoch, a checkpoint every 4
    raw["runtime"]["checkpoint"] = {"every_steps": 4, "keep": 2}
    run_dir, markers, cnn_killed, coordinator_killed = tmp_path / "run", tmp_path / "markers", tmp_path / "cnn-killed", tmp_path / "killed"
    markers.mkdir()
    # its 7th forward is step 6 (past checkpoint 4); after the rollback to 4 its 21st is step 17 (past checkpoint 16)
    holds = [{"how": "wait_for", "where": "step", "after": 6, "path": str(cnn_killed), "seconds": 120},
             {"how": "wait_for", "where": "step", "after": 20, "path": str(coordinator_killed), "seconds": 120}]
    raw["students"][0] = {"name": "mlp", "model": "tests.integration.faulty_models:mlp_with_faults",
                          "options": {"faults": holds, "markers": str(markers), "run_dir": str(run_dir)}}
    config_path.write_text(yaml.safe_dump(raw))
    address = f"127.0.0.1:{port}"
    driver = _start(["train", str(config_path), "--no-progress"], tmp_path, tmp_path / "driver.log")
    external = _start(["student", str(config_path), "--coordinator", address, "--name", "outside"], tmp_path,
                      tmp_path / "external.log")
    with _stopped_at_the_end(driver, external):
        for index, (who, released) in enumerate([("cnn", cnn_killed), ("coordinator", coordinator_killed)]):
            wait_until(lambda index=index: (markers / f"fault-{index}").exists(), f"mlp holds the cohort for {who}", 180)
            _kill(run_dir, who)
            released.touch()
        external_log = _finish(external, tmp_path / "external.log", 300)
        driver_log = _finish(driver, tmp_path / "driver.log", 120)
    assert driver.returncode == 0, driver_log
    assert external.returncode == 0, external_log
    rejoins = int(external_log.split(" rejoins")[0].rsplit("(", 1)[-1].split(", ")[-1])
    assert rejoins >= 2, external_log
    faults = read_json(run_dir / "results.json")["faults"]["events"]
    assert [fault["kind"] for fault in faults] == ["student_died", "coordinator_died"]
    _assert_in_process_trajectory(config_path, run_dir, tmp_path / "local", steps=24)


@pytest.mark.timeout(300)
def test_an_external_student_recovers_from_non_finite_logits_and_the_run_goes_on(tmp_path: Path) -> None:
    port = free_port()
    config_path = _mixed_config(tmp_path, port)
    raw = yaml.safe_load(config_path.read_text())
    raw["students"][2] = {"name": "outside", "model": "tests.unit.sample_factories:diverges_once",
                          "options": {"diverge_at": 4}, "external": True}  # its 4th training forward is NaN
    config_path.write_text(yaml.safe_dump(raw))
    driver = _start(["train", str(config_path), "--no-progress"], tmp_path, tmp_path / "driver.log")
    external = _start(["student", str(config_path), "--coordinator", f"127.0.0.1:{port}", "--name", "outside"], tmp_path,
                      tmp_path / "external.log")
    with _stopped_at_the_end(driver, external):
        external_log = _finish(external, tmp_path / "external.log", 240)
        driver_log = _finish(driver, tmp_path / "driver.log", 120)
    assert external.returncode == 0 and "finished at step 12 (2 evaluations, 0 rejoins, 1 non-finite recoveries)" in external_log
    assert driver.returncode == 0, driver_log
    rows = {(int(row["step"]), row["student"]) for row in read_steps(tmp_path / "run")}
    assert (3, "outside") not in rows and (3, "mlp") in rows and (4, "outside") in rows  # the peers went on without it
    assert len(rows) == 3 * 12 - 1


@pytest.mark.timeout(300)
def test_an_external_student_that_does_not_rejoin_a_restarted_coordinator_is_a_timeout_the_policy_counts(tmp_path: Path) -> None:
    """The external student and then the coordinator are killed: the restore's wait for the student to join again
    ends in a ``timeout`` failure, counted like any other, until the budget is spent and the run stops saying so."""
    port = free_port()
    config_path = _mixed_config(tmp_path, port, join_timeout_s=10)  # the driver's wait, at the start and after the restart
    raw = yaml.safe_load(config_path.read_text())
    raw["training"]["batch_size"] = 128
    raw["runtime"]["checkpoint"] = {"every_steps": 4, "keep": 2}
    raw["runtime"]["fault"] = {"max_failures": 1}
    run_dir, markers, killed = tmp_path / "run", tmp_path / "markers", tmp_path / "killed"
    markers.mkdir()
    # mlp holds the cohort at step 6 (past checkpoint 4) until both processes are killed: the run cannot end first
    hold = [{"how": "wait_for", "where": "step", "after": 6, "path": str(killed), "seconds": 120}]
    raw["students"][0] = {"name": "mlp", "model": "tests.integration.faulty_models:mlp_with_faults",
                          "options": {"faults": hold, "markers": str(markers), "run_dir": str(run_dir)}}
    config_path.write_text(yaml.safe_dump(raw))
    driver = _start(["train", str(config_path), "--no-progress"], tmp_path, tmp_path / "driver.log")
    external = _start(["student", str(config_path), "--set", "rpc.join_timeout_s=120", "--coordinator", f"127.0.0.1:{port}",
                       "--name", "outside"], tmp_path, tmp_path / "external.log")  # it waits for the service to come up
    with _stopped_at_the_end(driver, external):
        wait_until(lambda: (markers / "fault-0").exists(), "mlp holds the cohort at step 6", 120)
        os.killpg(external.pid, signal.SIGKILL)
        external.wait()
        _kill_after_checkpoint(run_dir, 4, "coordinator")
        killed.touch()
        driver_log = _finish(driver, tmp_path / "driver.log", 180)
    assert driver.returncode == 1, driver_log
    assert "2 failures, more than runtime.fault.max_failures=1" in driver_log, driver_log
    events = read_json(run_dir / "results.json")["faults"]["events"]
    assert [event["kind"] for event in events] == ["coordinator_died", "timeout"], events
    assert "external student(s) outside did not join the cohort service" in events[-1]["cause"]
    assert events[-1]["action"] == "the run stopped"


@pytest.mark.timeout(300)
def test_under_continue_a_silent_external_student_is_dropped_and_joins_again_when_it_sends(tmp_path: Path) -> None:
    """The external student sends nothing for step 2 until told: after the exchange timeout the Ray students go on
    without it (no rollback), the drop is a ``student_silent`` failure in the run's faults, and once it sends again
    it is refused as not live, joins again and trains to the run's end with its peers."""
    port = free_port()
    config_path = _mixed_config(tmp_path, port)
    raw = yaml.safe_load(config_path.read_text())
    raw["training"]["batch_size"] = 128  # 12 steps per epoch, a checkpoint every 4
    raw["runtime"]["checkpoint"] = {"every_steps": 4, "keep": 2}
    raw["runtime"]["fault"] = {"on_student_failure": "continue"}
    raw["runtime"]["ray"] = {"exchange_timeout_s": 20}  # the drop's wait, and the bound on mlp's hold below (until the rejoin)
    run_dir, woken = tmp_path / "run", tmp_path / "woken"
    outside_markers, mlp_markers = tmp_path / "outside-markers", tmp_path / "mlp-markers"
    outside_markers.mkdir()
    mlp_markers.mkdir()
    # outside stalls in its step-2 forward until the test wakes it, then marks its first step after joining again
    silent = [{"how": "wait_for", "where": "step", "after": 2, "path": str(woken), "seconds": 120},
              {"how": "mark", "where": "step", "after": 3}]
    raw["students"][2] = {"name": "outside", "model": "tests.integration.faulty_models:mlp_with_faults", "external": True,
                          "options": {"faults": silent, "markers": str(outside_markers), "run_dir": str(run_dir)}}
    # mlp holds the cohort at step 6 (after the drop) until outside has joined again: the run cannot end first
    hold = [{"how": "wait_for", "where": "step", "after": 6, "path": str(outside_markers / "fault-1"), "seconds": 120}]
    raw["students"][0] = {"name": "mlp", "model": "tests.integration.faulty_models:mlp_with_faults",
                          "options": {"faults": hold, "markers": str(mlp_markers), "run_dir": str(run_dir)}}
    config_path.write_text(yaml.safe_dump(raw))
    driver = _start(["train", str(config_path), "--no-progress"], tmp_path, tmp_path / "driver.log")
    external = _start(["student", str(config_path), "--coordinator", f"127.0.0.1:{port}", "--name", "outside"], tmp_path,
                      tmp_path / "external.log")
    with _stopped_at_the_end(driver, external):
        wait_until(lambda: (mlp_markers / "fault-0").exists(), "the cohort reaches step 6 without outside", 180)
        woken.touch()
        external_log = _finish(external, tmp_path / "external.log", 180)
        driver_log = _finish(driver, tmp_path / "driver.log", 120)
    assert driver.returncode == 0, driver_log
    assert external.returncode == 0 and "finished at step 24 (2 evaluations, 1 rejoins, 0 non-finite recoveries)" in external_log, external_log
    (event,) = read_json(run_dir / "results.json")["faults"]["events"]
    assert (event["kind"], event["student"], event["step"]) == ("student_silent", "outside", 2), event
    assert event["action"].startswith("the live students went on"), event
    rows = {(int(row["step"]), row["student"]) for row in read_steps(run_dir)}
    assert {step for step, student in rows if student == "outside"} == {0, 1, *range(6, 24)}
    assert all((step, name) in rows for step in range(24) for name in ("mlp", "cnn"))  # the Ray students never went back
