"""Two default ``rdml-dist train`` runs started at once on one machine: both complete, each at its own addresses."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.cli_process import run_cli

RPC_LINE = re.compile(r"rdml-dist INFO cohort service \(gRPC\) at (\S+)")
METRICS_LINE = re.compile(r"rdml-dist INFO metrics at http://(\S+)/metrics")


def test_two_default_runs_started_at_once_both_complete_at_their_own_addresses(tmp_path: Path) -> None:
    targets = tmp_path / "targets.json"
    commands = [
        ["train", "--no-progress", "--run-dir", str(tmp_path / name), "--set", f"name={name}", "--set", "training.epochs=1",
         "--set", "runtime.torch_threads=1", "--set", f"monitoring.file_sd={targets}"]
        for name in ("first", "second")
    ]  # the embedded default config: rpc.port 50151 and monitoring.port 9464 for both
    listed: dict[str, set[str]] = {"first": set(), "second": set()}
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_cli, command, cwd=tmp_path, timeout_s=420) for command in commands]
        deadline = time.monotonic() + 450
        while not all(run.done() for run in runs) and time.monotonic() < deadline:
            if targets.exists() and targets.stat().st_size:
                for entry in json.loads(targets.read_text()):
                    listed[entry["labels"]["run"]].update(entry["targets"])
            time.sleep(0.2)
        results = [run.result() for run in runs]

    addresses = []
    for name, result in zip(("first", "second"), results):
        assert result.returncode == 0, result.stderr[-3000:]
        rpc, metrics = RPC_LINE.findall(result.stderr), METRICS_LINE.findall(result.stderr)
        assert len(rpc) == len(metrics) == 1, result.stderr
        coordinator = json.loads((tmp_path / name / "placements.json").read_text())["coordinator"]
        assert (coordinator["rpc"], coordinator["metrics"]) == (rpc[0], metrics[0])
        assert listed[name] == {metrics[0]}  # its own file_sd entry while it ran
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert len(results["epochs"]) == 1
        events = EventAccumulator(str(tmp_path / name / "tensorboard"))
        events.Reload()
        for student in results["students"]:  # the default run's TensorBoard events, read by TensorBoard's reader
            (point,) = events.Scalars(f"student/{student}/val_accuracy")
            assert (point.step, round(point.value, 6)) == (0, round(results["epochs"][0]["students"][student]["val_accuracy"], 6))
        assert sorted(path.name for path in (tmp_path / name / "plots").iterdir()) == ["accuracy.png", "losses.png", "timing.png"]
        addresses.append((rpc[0], metrics[0]))
    assert len({address for pair in addresses for address in pair}) == 4, addresses
    assert json.loads(targets.read_text()) == []  # each run took its entry away when it ended
