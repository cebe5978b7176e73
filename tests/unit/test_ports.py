"""Several runs on one machine: ports nobody has to agree on fall back to free ones; file_sd keeps one entry per run."""

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import parse_config
from rdml_dist.errors import ClusterError
from rdml_dist.metrics import FileSdEntry, metrics_address, serve
from rdml_dist.rpc.server import start_cohort_server


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process is listening on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_metrics_fall_back_to_a_free_port_when_the_configured_one_is_taken(taken_port: int) -> None:
    registry = CollectorRegistry()
    Counter("rdml_probe", "a metric to find in the scrape", registry=registry).inc()
    server = serve(registry, "127.0.0.1", taken_port)
    try:
        address = metrics_address("127.0.0.1", server, "127.0.0.1")
        assert address != f"127.0.0.1:{taken_port}"
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            assert "rdml_probe_total 1.0" in response.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_on_an_address_of_no_interface_is_a_clear_error() -> None:
    with pytest.raises(ClusterError, match="monitoring: cannot serve metrics on 192.0.2.1:9464"):
        serve(CollectorRegistry(), "192.0.2.1", 9464)  # TEST-NET-1: never this machine's


def _serve_cohort(config_students: list[dict], port: int) -> str:
    """Start (and stop) the cohort service of a config with ``rpc.port`` = ``port``; returns its address."""
    config = parse_config({"students": config_students, "rpc": {"port": port}})

    async def start_and_stop() -> str:
        server = await start_cohort_server(CohortBarrier(config), None, "127.0.0.1")
        await server.stop(0)
        return server.address

    return asyncio.run(start_and_stop())


def test_the_cohort_service_takes_a_free_port_when_no_student_needs_the_configured_one(taken_port: int) -> None:
    address = _serve_cohort([{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "b"}], taken_port)
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (0, taken_port)


def test_with_an_external_student_the_configured_port_is_required(taken_port: int) -> None:
    students = [{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "far", "external": True}]
    with pytest.raises(ClusterError, match=f"cannot serve the cohort service on 127.0.0.1:{taken_port}.*choose another rpc.port"):
        _serve_cohort(students, taken_port)


def test_file_sd_keeps_one_entry_per_run_and_drops_it_when_the_run_ends(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    runs = [FileSdEntry(str(path), f"run-{index}") for index in range(8)]
    threads = [threading.Thread(target=run.point_at, args=(f"127.0.0.1:{9500 + index}",)) for index, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    listed = {entry["labels"]["run"]: entry["targets"] for entry in json.loads(path.read_text())}
    assert listed == {f"run-{index}": [f"127.0.0.1:{9500 + index}"] for index in range(8)}

    runs[0].point_at("127.0.0.1:9600")  # its coordinator restarted on another port: the old target goes
    runs[1].remove()
    listed = {entry["labels"]["run"]: entry["targets"] for entry in json.loads(path.read_text())}
    assert listed["run-0"] == ["127.0.0.1:9600"] and "run-1" not in listed and len(listed) == 7


class FileSdProbe:
    """Reads the file_sd file while the run goes on (an observer of its epochs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[list[dict]] = []

    def on_epoch(self, entry: dict) -> None:
        self.seen.append(json.loads(self.path.read_text()))

    def on_checkpoint(self, step: int, manifest: dict) -> None:
        pass


def test_a_local_run_lists_its_metrics_in_file_sd_while_it_runs(tmp_path: Path) -> None:
    from rdml_dist.engines import run_session
    from rdml_dist.engines.session import new_session

    targets = tmp_path / "targets.json"
    FileSdEntry(str(targets), "another-run").point_at("127.0.0.1:1")  # a run already listed stays listed
    config = parse_config({
        "name": "local-sd", "students": [{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "b"}],
        "training": {"epochs": 1, "batch_size": 256}, "runtime": {"engine": "local", "torch_threads": 1},
        "monitoring": {"port": 0, "file_sd": str(targets)},
    })
    probe = FileSdProbe(targets)
    with new_session(config, tmp_path / "run") as session:
        run_session(session, show_progress=False, observers=[probe])
    (during,) = probe.seen
    assert {entry["labels"]["run"] for entry in during} == {"another-run", "local-sd"}
    assert json.loads(targets.read_text()) == [{"targets": ["127.0.0.1:1"], "labels": {"run": "another-run"}}]


@pytest.mark.parametrize("content", [b"{not json", b'{"targets": ["127.0.0.1:1"]}', b'[{"targets": [["127.0.0.1:1"]]}]', b"\xff\xfe"])
def test_a_file_sd_file_that_is_not_a_target_list_is_kept_aside_and_a_new_one_written(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "targets.json"
    path.write_bytes(content)
    run = FileSdEntry(str(path), "run-0")
    run.point_at("127.0.0.1:9500")
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:9500"], "labels": {"run": "run-0"}}]
    aside = [entry for entry in tmp_path.iterdir() if entry.name.startswith("targets.json.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # nothing of the user's file is lost
    run.remove()
    assert json.loads(path.read_text()) == []
