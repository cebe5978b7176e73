"""Without --address a private local Ray is started, whatever cluster the machine has or had; bad addresses fail fast."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_process import child_environment, free_port, processes_mentioning, run_cli, write_config
from tests.integration.conftest import read_json, wait_until

CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")



def _ray_cli() -> str:
    """The ``ray`` command of the interpreter running the tests."""
    return str(Path(sys.executable).parent / "ray")


def head_processes(port: int) -> list[int]:
    """Every process of the head node at PORT (the GCS server names its port alone, the others the address)."""
    return sorted({*processes_mentioning(f"127.0.0.1:{port}"), *processes_mentioning(f"--gcs_server_port={port}")})


@contextlib.contextmanager
def head_node(port: int) -> Iterator[list[int]]:
    """A real ``ray start --head`` on 127.0.0.1:PORT (one CPU); yields its processes and kills them on exit."""
    started = subprocess.run(
        [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--ray-client-server-port", str(free_port()), "--disable-usage-stats"],
        env=child_environment(), capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    assert started.returncode == 0, started.stderr
    address = f"127.0.0.1:{port}"
    try:
        # `ray start` names its cluster in the current-cluster file; other tests' clusters, started side by side,
        # may have named theirs since: name this one again, as `ray start` left it.
        CURRENT_CLUSTER_FILE.write_text(address)
        yield head_processes(port)
    finally:
        kill_head(port)
        if CURRENT_CLUSTER_FILE.exists() and CURRENT_CLUSTER_FILE.read_text().strip() == address:
            CURRENT_CLUSTER_FILE.unlink()


def kill_head(port: int) -> None:
    """SIGKILL the head node, as a crash would: Ray's current-cluster file is left behind."""
    for pid in head_processes(port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not head_processes(port), "the head node's processes are gone")


def _train_without_address(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "experiment.yaml", tmp_path / "run")
    return run_cli(["train", str(config), "--no-progress"], cwd=tmp_path, timeout_s=240)


def _assert_trained_on_its_own_ray(result: subprocess.CompletedProcess[str], tmp_path: Path, cluster: str) -> None:
    assert result.returncode == 0, result.stderr
    startup = [line.split(" rdml-dist INFO ", 1)[1] for line in result.stderr.splitlines() if " rdml-dist INFO " in line]
    assert startup and startup[0].startswith("started a local Ray at 127.0.0.1:"), result.stderr
    assert cluster not in startup[0]
    assert len(read_json(tmp_path / "run" / "results.json")["epochs"]) == 1


@pytest.mark.timeout(300)
def test_plain_train_starts_its_own_ray_beside_a_running_cluster(tmp_path: Path) -> None:
    port = free_port()
    with head_node(port) as processes:
        result = _train_without_address(tmp_path)
        _assert_trained_on_its_own_ray(result, tmp_path, f"127.0.0.1:{port}")
        # The user's cluster was neither joined nor stopped.
        assert all(Path(f"/proc/{pid}").exists() for pid in processes)


@pytest.mark.timeout(300)
def test_plain_train_ignores_a_stale_current_cluster_file(tmp_path: Path) -> None:
    port = free_port()
    with head_node(port):
        kill_head(port)  # the cluster dies without `ray stop`: its address file stays behind
        CURRENT_CLUSTER_FILE.write_text(f"127.0.0.1:{port}")  # as the crash left it (a cluster beside may have renamed it)
        result = _train_without_address(tmp_path)
        _assert_trained_on_its_own_ray(result, tmp_path, f"127.0.0.1:{port}")


@pytest.mark.timeout(120)
def test_an_address_where_nothing_listens_fails_fast_with_one_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "experiment.yaml", tmp_path / "run")
    started = time.monotonic()
    result = run_cli(["train", str(config), "--no-progress", "--address", address], cwd=tmp_path, timeout_s=90)
    assert time.monotonic() - started < 60
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rdml-dist: no Ray cluster answers at {address}"), result.stderr
    assert not (tmp_path / "run").exists()
