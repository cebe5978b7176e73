"""Two default ``rdml-dist train`` runs at once on one machine: both complete, each at its own addresses."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.cli_process import run_cli

RPC_LINE = re.compile(r"rdml-dist INFO cohort service \(gRPC\) at (\S+)")
METRICS_LINE = re.compile(r"rdml-dist INFO metrics at http://(\S+)/metrics")


@pytest.mark.timeout(900)
def test_two_default_runs_at_once_both_complete_at_their_own_addresses(tmp_path: Path) -> None:
    """The second run starts once the first serves its metrics, and the first waits in its step 5 until the second
    has ended (its mlp is a test model that holds the cohort there), so the two surely overlap."""
    targets, second_ended, markers = tmp_path / "targets.json", tmp_path / "second-ended", tmp_path / "markers"
    markers.mkdir()
    epochs = {"first": 1, "second": 1}
    commands = {
        name: ["train", "--no-progress", "--run-dir", str(tmp_path / name), "--set", f"name={name}",
               "--set", f"training.epochs={epochs[name]}", "--set", "runtime.torch_threads=1", "--set", f"monitoring.file_sd={targets}"]
        for name in ("first", "second")
    }  # the embedded default config: rpc.port 50151 and monitoring.port 9464 for both
    hold = {"faults": [{"how": "wait_for", "where": "step", "after": 5, "path": str(second_ended), "seconds": 240}],
            "markers": str(markers), "run_dir": str(tmp_path / "first")}
    commands["first"] += ["--set", "students.0.model=tests.integration.faulty_models:mlp_with_faults",
                          "--set", f"students.0.options={json.dumps(hold)}"]  # its peers wait within the exchange timeout (300 s)
    listed: dict[str, set[str]] = {"first": set(), "second": set()}
    side_by_side: list[dict[str, list[str]]] = []  # file_sd snapshots in which both runs served their metrics
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_cli, commands["first"], cwd=tmp_path, timeout_s=600)]
        deadline = time.monotonic() + 630
        while not all(run.done() for run in runs) and time.monotonic() < deadline:
            if targets.exists() and targets.stat().st_size:
                snapshot = {entry["labels"]["run"]: entry["targets"] for entry in json.loads(targets.read_text())}
                for name, served in snapshot.items():
                    listed[name].update(served)
                if len(snapshot) == 2:
                    side_by_side.append(snapshot)
                if "first" in snapshot and len(runs) == 1:  # the first serves: the second starts beside it
                    runs.append(pool.submit(run_cli, commands["second"], cwd=tmp_path, timeout_s=600))
            if len(runs) == 2 and runs[1].done():
                second_ended.touch()  # the first goes on
            time.sleep(0.2)
        results = [run.result() for run in runs]
    assert len(results) == 2, "the first run never listed its metrics"
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert side_by_side, f"the two runs never served their metrics at the same time (each listed at {listed})"
    for snapshot in side_by_side:  # live at once, they never share a metrics address
        assert not set(snapshot["first"]) & set(snapshot["second"]), snapshot

    addresses = []
    for name, result in zip(("first", "second"), results):
        rpc, metrics = RPC_LINE.findall(result.stderr), METRICS_LINE.findall(result.stderr)
        assert len(rpc) == len(metrics) == 1, result.stderr
        coordinator = json.loads((tmp_path / name / "placements.json").read_text())["coordinator"]
        assert (coordinator["rpc"], coordinator["metrics"]) == (rpc[0], metrics[0])
        assert listed[name] == {metrics[0]}  # its own file_sd entry while it ran
        run = json.loads((tmp_path / name / "results.json").read_text())
        assert len(run["epochs"]) == epochs[name]
        events = EventAccumulator(str(tmp_path / name / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        for student in run["students"]:  # the default run's TensorBoard events, read by TensorBoard's reader
            points = [(point.step, round(point.value, 6)) for point in events.Scalars(f"student/{student}/val_accuracy")]
            assert points == [(entry["epoch"], round(entry["students"][student]["val_accuracy"], 6)) for entry in run["epochs"]]
        assert sorted(path.name for path in (tmp_path / name / "plots").iterdir()) == ["accuracy.png", "losses.png", "timing.png"]
        addresses.append((rpc[0], metrics[0]))
    assert addresses[0][0] != addresses[1][0], addresses  # live at once, each cohort service on a port of its own
    assert json.loads(targets.read_text()) == []  # each run took its entry away when it ended
