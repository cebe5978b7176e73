"""A run has one writer: a second ``rdml-dist train`` of a run that is still training never writes into it.

Both drivers are real ``rdml-dist`` processes (the local engine: the lease is the driver's, whatever
runs the students). The first driver's student hangs at a chosen step, after a checkpoint beyond
step 0 (the moment an unfinished run looks resumable); the second starts then. The hang fires once
(:mod:`tests.integration.faulty_models`), so the second driver's students do not hang.
"""

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.run_records.storage import Storage
from tests.integration.cli_process import RDML_DIST, child_environment, run_cli
from tests.integration.conftest import wait_until

EPOCHS = 4
HANG_AT_STEP = 30  # in the second epoch (23 steps each), after the checkpoint of step 23


def _train_args(tmp_path: Path, hang_s: float, *extra: str) -> list[str]:
    """``train`` of one config (the same for both drivers): student ``a`` hangs ``hang_s`` once, at HANG_AT_STEP."""
    config = tmp_path / "experiment.yaml"
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    fault = {"how": "hang", "where": "step", "after": HANG_AT_STEP, "seconds": hang_s}
    options = {"faults": [fault], "markers": str(markers), "run_dir": str(tmp_path / "run")}
    config.write_text(yaml.safe_dump({
        "name": "one-writer",
        "students": [{"name": "a", "model": "tests.integration.faulty_models:mlp_with_faults", "options": options},
                     {"name": "b", "model": "mlp"}],
        "training": {"epochs": EPOCHS, "batch_size": 64},
        "runtime": {"engine": "local", "torch_threads": 1, "run_dir": str(tmp_path / "run")},
        "monitoring": {"port": 0},
    }))
    return ["train", str(config), "--no-progress", *extra]


def _hanging(tmp_path: Path, driver: subprocess.Popen[bytes]) -> bool:
    return (tmp_path / "markers" / "fault-0").exists() or driver.poll() is not None


@contextlib.contextmanager
def _driver(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An ``rdml-dist`` process in its own process group, SIGKILLed with it if still running at the end."""
    with log.open("w") as out:
        process = subprocess.Popen([*RDML_DIST, *args], cwd=log.parent, env=child_environment(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _epochs(run_dir: Path) -> list[int]:
    return [entry["epoch"] for entry in json.loads((run_dir / "results.json").read_text())["epochs"]]


@pytest.mark.timeout(300)
def test_a_second_plain_train_of_a_running_run_trains_a_sibling_and_touches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with _driver(_train_args(tmp_path, 10.0), tmp_path / "first.log") as first:
        wait_until(lambda: _hanging(tmp_path, first), "the first run reaches its hang", 120)
        assert first.poll() is None and CheckpointStore(Storage(str(run_dir))).latest()["step"] > 0
        second = run_cli(_train_args(tmp_path, 10.0), cwd=tmp_path, timeout_s=240)
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines()[0].startswith(
            f"rdml-dist: a new run at {run_dir}-2 ({run_dir} is being written by another driver (pid {first.pid} on ")
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()
    assert _epochs(run_dir) == _epochs(tmp_path / "run-2") == list(range(EPOCHS))
    assert sorted(path.name for path in (run_dir / "lease").iterdir()) == ["00000001.json"]  # nobody else took it
    assert "resuming" not in second.stdout + second.stderr


@pytest.mark.timeout(300)
def test_a_retried_job_waits_for_the_running_driver_and_continues_the_run_once_it_is_gone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with _driver(_train_args(tmp_path, 600.0), tmp_path / "first.log") as first:
        wait_until(lambda: _hanging(tmp_path, first), "the first run reaches its hang", 120)
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        with _driver(_train_args(tmp_path, 600.0, "--if-running", "wait"), tmp_path / "retry.log") as retry:
            wait_until(lambda: "waiting up to 300 s" in (tmp_path / "retry.log").read_text() or retry.poll() is not None,
                       "the retry says it waits", 60)
            results_while_waiting = (run_dir / "results.json").read_bytes()
            lease_files = sorted(path.name for path in (run_dir / "lease").iterdir())
            assert retry.poll() is None and lease_files == ["00000001.json"], (tmp_path / "retry.log").read_text()
            os.killpg(first.pid, signal.SIGKILL)  # the first driver dies: its lease is free at once on this host
            first.wait(timeout=30)
            checkpoint = CheckpointStore(Storage(str(run_dir))).latest()["step"]
            assert retry.wait(timeout=240) == 0, (tmp_path / "retry.log").read_text()
    said = (tmp_path / "retry.log").read_text()
    assert f"resuming the unfinished run at {run_dir} from its checkpoint at step {checkpoint}" in said
    assert results_while_waiting != (run_dir / "results.json").read_bytes()  # written again, by the retry alone
    assert _epochs(run_dir) == list(range(EPOCHS))
    assert not (tmp_path / "run-2").exists()
    assert json.loads((run_dir / "lease" / "00000002.json").read_text())["released"]
