"""The driver as a real process: SIGKILLed mid-run and completed with ``--resume``; and submitted as a Ray job.

Each test runs ``rdml-dist`` (and ``ray``) as child processes on loopback and stops everything it started.
"""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.integration.cli_process import RDML_DIST, child_environment, free_port, processes_mentioning, run_cli, write_config
from tests.integration.conftest import wait_until

TIMING_COLUMNS = {"wait_seconds", "coordinator_seconds", "compute_seconds", "round_trip_seconds"}
TIMING_KEYS = {"seconds", *TIMING_COLUMNS, "exchange_overhead_seconds"}
STEPS = 2 * 12  # two epochs of ceil(1437 / 128) steps


def _ray_processes(port: int) -> list[int]:
    return sorted({*processes_mentioning(f"127.0.0.1:{port}"), *processes_mentioning(f"--gcs_server_port={port}")})


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _without_timing(value: object) -> object:
    if isinstance(value, dict):
        return {key: _without_timing(item) for key, item in value.items() if key not in TIMING_KEYS and not key.startswith("mean_")}
    if isinstance(value, list):
        return [_without_timing(item) for item in value]
    return value


def _steps(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "steps.csv").open(newline="") as handle:
        return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


@pytest.mark.timeout(420)
def test_a_killed_driver_leaves_a_run_that_resume_completes_exactly(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "experiment.yaml", tmp_path / "run",
        training={"epochs": 2, "batch_size": 128}, runtime={"checkpoint": {"every_steps": 4, "keep": 2}},
    )
    whole = run_cli(["train", str(config), "--no-progress", "--run-dir", str(tmp_path / "whole")], cwd=tmp_path, timeout_s=240)
    assert whole.returncode == 0, whole.stderr

    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([*RDML_DIST, "train", str(config), "--no-progress"], cwd=tmp_path, env=child_environment(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    port = None
    try:
        wait_until(lambda: (tmp_path / "run" / "checkpoints" / "step-00000008" / "manifest.json").exists(), "checkpoint 8", 180)
        port = int(re.search(r"started a local Ray at 127\.0\.0\.1:(\d+)", (tmp_path / "driver.log").read_text()).group(1))
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
        wait_until(lambda: not _ray_processes(port), "the killed driver's local Ray goes with it", 60)
    finally:
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        if port is not None:
            _kill_all(_ray_processes(port))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["epochs"]) < 2  # it really stopped before the end

    resumed = run_cli(["train", "--resume", str(tmp_path / "run"), "--no-progress"], cwd=tmp_path, timeout_s=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "ensemble" in resumed.stdout
    whole_results = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed_results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(resumed_results["epochs"]) == 2
    assert _without_timing(resumed_results["epochs"]) == _without_timing(whole_results["epochs"])
    assert _without_timing(resumed_results["summary"]) == _without_timing(whole_results["summary"])
    assert _steps(tmp_path / "run") == _steps(tmp_path / "whole")
    final = f"checkpoints/step-{STEPS:08d}"
    for name in ("mlp", "cnn"):
        expected = torch.load(tmp_path / "whole" / final / f"{name}.pt", weights_only=True)["model"]
        actual = torch.load(tmp_path / "run" / final / f"{name}.pt", weights_only=True)["model"]
        assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items()), name


def _ray(*args: str, timeout_s: float = 180, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=child_environment(**environment),
                          capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def head_with_jobs(cpus: int) -> Iterator[str]:
    """A real ``ray start --head`` on loopback with its job server; yields the job API address."""
    port, dashboard = free_port(), free_port()
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={cpus}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={free_port()}", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_all(_ray_processes(port))
        wait_until(lambda: not _ray_processes(port), "the head node stops", 30)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


@pytest.mark.timeout(420)
def test_a_ray_job_writes_results_and_checkpoints_to_storage_that_outlives_it(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    entrypoint = f"{sys.executable} -m rdml_dist.cli train --no-progress --set training.epochs=1 --set runtime.storage={storage}"
    with head_with_jobs(cpus=4) as jobs:
        submitted = _ray("job", "submit", "--address", jobs, "--working-dir", str(working_dir), "--", *entrypoint.split(),
                         timeout_s=300, RAY_AUTH_MODE="token")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "joined the Ray cluster at 127.0.0.1:" in submitted.stdout
        assert re.search(r"Job '[^']+' succeeded", submitted.stdout), submitted.stdout

        relative = f"{sys.executable} -m rdml_dist.cli train --no-progress --run-dir runs/lost"
        refused = _ray("job", "submit", "--address", jobs, "--working-dir", str(working_dir), "--", *relative.split(),
                       timeout_s=300, RAY_AUTH_MODE="token")
        assert "'runs/lost' is relative, and this driver runs as a Ray job" in refused.stdout + refused.stderr
    run_dir = storage / "digits-renyi"
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["epochs"]) == 1 and set(results["students"]) == {"mlp", "cnn", "resnet20"}
    final = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert {path.name for path in final.iterdir()} == {"mlp.pt", "cnn.pt", "resnet20.pt", "manifest.json"}
    assert not list(working_dir.iterdir())  # nothing was written next to the job's files
