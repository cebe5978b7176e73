"""The driver as a real process: SIGKILLed mid-run and completed with ``--resume``; and submitted as a Ray job.

Each test runs ``rdml-dist`` (and ``ray``) as child processes on loopback and stops everything it started.
"""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.integration.cli_process import RDML_DIST, child_environment, free_ports, processes_mentioning, run_cli, write_config
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


def _config(tmp_path: Path) -> Path:
    """Two epochs with a checkpoint every 4 steps, run dir ``tmp_path/run``."""
    return write_config(
        tmp_path / "experiment.yaml", tmp_path / "run",
        training={"epochs": 2, "batch_size": 128}, runtime={"checkpoint": {"every_steps": 4, "keep": 2}},
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config of :func:`_config` run whole once, by the CLI: the run every interrupted one must end as."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    whole = run_cli(["train", str(_config(directory)), "--no-progress", "--run-dir", str(directory / "whole")],
                    cwd=directory, timeout_s=240)
    assert whole.returncode == 0, whole.stderr
    return directory / "whole"


def _assert_same_as_uninterrupted(run_dir: Path, whole: Path) -> None:
    """Same epochs, summary (timings aside), step log and final weights as the uninterrupted run."""
    whole_results = json.loads((whole / "results.json").read_text())
    resumed_results = json.loads((run_dir / "results.json").read_text())
    assert len(resumed_results["epochs"]) == 2
    assert _without_timing(resumed_results["epochs"]) == _without_timing(whole_results["epochs"])
    assert _without_timing(resumed_results["summary"]) == _without_timing(whole_results["summary"])
    assert _steps(run_dir) == _steps(whole)
    final = f"checkpoints/step-{STEPS:08d}"
    for name in ("mlp", "cnn"):
        expected = torch.load(whole / final / f"{name}.pt", weights_only=True)["model"]
        actual = torch.load(run_dir / final / f"{name}.pt", weights_only=True)["model"]
        assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items()), name


@pytest.mark.timeout(420)
def test_a_killed_driver_leaves_a_run_that_resume_completes_exactly(tmp_path: Path, uninterrupted: Path) -> None:
    config = _config(tmp_path)

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
    _assert_same_as_uninterrupted(tmp_path / "run", uninterrupted)


def _ray(*args: str, timeout_s: float = 180, **environment: str) -> subprocess.CompletedProcess[str]:
    """``ray ARGS`` in a session of its own: a head it starts lives outside the test worker's process group, which a
    Ray process reaper of another test in this worker may signal as a whole."""
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=child_environment(**environment),
                          capture_output=True, text=True, timeout=timeout_s, start_new_session=True)


@contextlib.contextmanager
def head_with_jobs(cpus: int) -> Iterator[str]:
    """A real ``ray start --head`` on loopback with its job server; yields the job API address.

    The head has a temp directory of its own: Ray's job supervisor gives each job's driver the address
    in its temp directory's current-cluster file, which a Ray started meanwhile by a test beside this
    one (``/tmp/ray`` is every Ray's default) would have rewritten, sending the driver to that cluster.
    """
    port, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rdml-head-", dir="/tmp")  # short: Ray's sockets live under it
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={cpus}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                   # the job agent's own port: its default (52365) may still be held by another Ray's agent shutting down
                   f"--dashboard-agent-listen-port={agent}")
    assert started.returncode == 0, started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_all(_ray_processes(port))
        wait_until(lambda: not _ray_processes(port), "the head node stops", 30)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def _submit_when_the_job_agent_is_up(*args: str) -> subprocess.CompletedProcess[str]:
    """``ray job <args>``, again while a fresh head's job agent is still starting (it refuses with a 500), for up to 2 minutes."""
    deadline = time.monotonic() + 120
    while True:
        submitted = _ray(*args, RAY_AUTH_MODE="token")
        if "No available agent to submit job" not in submitted.stdout + submitted.stderr or time.monotonic() > deadline:
            return submitted
        time.sleep(2)


@pytest.mark.timeout(600)
def test_a_killed_job_resubmitted_with_the_same_entrypoint_continues_to_the_uninterrupted_results(
    tmp_path: Path, uninterrupted: Path
) -> None:
    config = _config(tmp_path)
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    entrypoint = [sys.executable, "-m", "rdml_dist.cli", "train", str(config), "--no-progress"]
    with head_with_jobs(cpus=4) as jobs:
        submit = ["job", "submit", "--address", jobs, "--working-dir", str(working_dir)]
        first = _submit_when_the_job_agent_is_up(*submit, "--no-wait", "--", *entrypoint)
        assert first.returncode == 0, first.stdout + first.stderr
        wait_until(lambda: (tmp_path / "run" / "checkpoints" / "step-00000008" / "manifest.json").exists(), "checkpoint 8", 240)
        drivers = processes_mentioning(f"rdml_dist.cli train {config}")
        assert drivers, "the job's driver process"
        _kill_all(drivers)
        wait_until(lambda: not processes_mentioning(str(config)), "the killed driver is gone", 30)
        assert len(json.loads((tmp_path / "run" / "results.json").read_text())["epochs"]) < 2  # it stopped before the end

        # Ray drops the first job's working-directory package once its driver is killed, and a resubmission of the same
        # files is told it "already exists" and then fails to download it (worse on a loaded machine). Ray's own advice
        # is to change a file of the package: the retry's working directory holds one more file, its entrypoint is the same.
        (working_dir / "retry").write_text("1")
        again = _ray(*submit, "--", *entrypoint, timeout_s=300, RAY_AUTH_MODE="token")  # what a job retry does
        assert re.search(r"Job '[^']+' succeeded", again.stdout), again.stdout + again.stderr
        assert re.search(rf"rdml-dist: resuming the unfinished run at {re.escape(str(tmp_path / 'run'))} from its checkpoint "
                         r"at step (8|12|16|20) \(\d of 2 epochs done; its saved config is this one\)", again.stdout), again.stdout
    _assert_same_as_uninterrupted(tmp_path / "run", uninterrupted)
