"""What a checkpoint costs as a run grows: the run directory's write path and the driver's memory at 10^4-10^6 step rows.

A simulated run of 8 students, 391 steps per epoch (the CIFAR recipe at batch 128) and a
checkpoint at every epoch's end is driven through the real ``RunDirectory``, ``CheckpointStore``
and ``Storage`` (a local directory) with made-up step records. Each (code, rows) cell runs in a
fresh process, so its peak RSS is its own. The old code is ``rdml_dist/run_directory.py`` of
commit fa1f8a3, loaded from git into a module beside the new one; its state at N rows (all rows
in memory, every epoch's entry) is built directly, since replaying its per-epoch scans would be
quadratic. Timed: one epoch-end checkpoint at N rows, i.e. ``record_epoch`` + ``write_progress``
+ ``manifest`` + ``commit``, repeated (9 times for the new code, 3 for the old, once for the old at
10^6 rows); on a shared machine the fastest repetition is the least disturbed one, so the ratios use
it (the medians are in the JSON).

    .venv/bin/python benchmarks/long_run.py            # writes benchmarks/results/long_run.{json,md}
"""

import argparse
import importlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import parse_config
from rdml_dist.coordinator_core.coordinator import EpochEvaluation, StepRecord
from rdml_dist.run_records.storage import Storage

from earlier_code import module_at  # noqa: E402 - beside this script

ROWS = (10_000, 100_000, 1_000_000)
STUDENTS = tuple(f"s{index}" for index in range(8))
STEPS_PER_EPOCH = 391
OLD_COMMIT = "fa1f8a3"
RESULTS = Path(__file__).parent / "results"


def chunk(epoch: int, rng: random.Random) -> list[StepRecord]:
    """One epoch's step records (all students), the chunk between two checkpoints."""
    first = epoch * STEPS_PER_EPOCH
    return [
        StepRecord(step, epoch, student, rng.random(), rng.random(), rng.random(), 2.0, 1.0, rng.randint(0, 128), 128,
                   rng.randint(0, 128), 128, rng.random() / 1e3, rng.random() / 1e3, rng.random() / 1e2, rng.random() / 1e2)
        for step in range(first, first + STEPS_PER_EPOCH) for student in STUDENTS
    ]


def evaluation(epoch: int) -> EpochEvaluation:
    return EpochEvaluation(epoch, {student: 0.9 for student in STUDENTS}, 0.92)


def old_module() -> ModuleType:
    """``run_directory.py`` as it was at ``OLD_COMMIT``, imported under another name."""
    # its imports, by the names modules had then (the records and the coordinator's core were top-level modules)
    for then, now in (("rdml_dist.coordinator", "rdml_dist.messages"), ("rdml_dist.storage", "rdml_dist.run_records.storage")):
        sys.modules.setdefault(then, importlib.import_module(now))
    return module_at(OLD_COMMIT, "rdml_dist/run_directory.py", "old_run_directory")


def checkpoint(run: Any, store: CheckpointStore, epoch: int) -> tuple[float, float]:
    """The work of one epoch-end checkpoint after the chunk's records were added; returns its wall and CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    run.record_epoch(epoch, evaluation(epoch), 1.0)
    run.write_progress()
    store.commit(run.manifest((epoch + 1) * STEPS_PER_EPOCH, live=[]))
    return time.perf_counter() - started, time.process_time() - cpu


class SimulatedRun:
    """A run directory (new or old code) in a temporary directory, brought to ``rows`` step rows, checkpointing on."""

    def __init__(self, code: str, rows: int, directory: str, more_epochs: int) -> None:
        self.epochs = -(-rows // (STEPS_PER_EPOCH * len(STUDENTS)))
        self.rng = random.Random(0)
        storage = Storage(directory)
        config = parse_config({"name": "long", "students": [{"model": "mlp", "name": name} for name in STUDENTS],
                               "training": {"epochs": self.epochs + more_epochs + 1},
                               "runtime": {"engine": "local", "run_dir": directory}})
        self.store = CheckpointStore(storage)
        if code == "new":
            from rdml_dist.run_records.run_directory import RunDirectory

            self.run = RunDirectory(storage, config, "local")
            self.run.write_config()
            for epoch in range(self.epochs - 1):
                self.run.add_records(chunk(epoch, self.rng))
                checkpoint(self.run, self.store, epoch)
        else:
            old = old_module()
            self.run = old.RunDirectory(storage, config, "local")
            self.run.write_config()
            for epoch in range(self.epochs - 1):  # the state the old code holds after these epochs, built without its rescans
                records = chunk(epoch, self.rng)
                self.run.add_records(records)
                self.run.epochs.append({"epoch": epoch, "seconds": 1.0, "alpha": 2.0, "mimicry_weight": 1.0,
                                        "ensemble_val_accuracy": 0.92,
                                        "students": {name: {**values, "val_accuracy": 0.9}
                                                     for name, values in old.summarize_training(records).items()}})
        self.epoch = self.epochs - 1

    def next_checkpoint(self) -> tuple[float, float]:
        """The next epoch's records, then its checkpoint: wall and CPU seconds."""
        self.run.add_records(chunk(self.epoch, self.rng))
        seconds = checkpoint(self.run, self.store, self.epoch)
        self.store.prune(2)
        self.epoch += 1
        return seconds


def timings(seconds: list[tuple[float, float]]) -> dict[str, Any]:
    walls, cpus = [wall for wall, _ in seconds], [cpu for _, cpu in seconds]
    return {"checkpoint_seconds": min(walls), "checkpoint_seconds_median": statistics.median(walls),
            "checkpoint_cpu_seconds": min(cpus), "checkpoint_cpu_seconds_median": statistics.median(cpus),
            "checkpoint_seconds_all": walls}


def measure(code: str, rows: int) -> dict[str, Any]:
    """One cell, in this process: reach ``rows`` step rows, then time epoch-end checkpoints; peak RSS."""
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = 9 if code == "new" else 3 if rows < 1_000_000 else 1
    with tempfile.TemporaryDirectory(prefix="long-run-") as directory:
        simulated = SimulatedRun(code, rows, directory, timed)
        seconds = [simulated.next_checkpoint() for _ in range(timed)]
        manifest_bytes = len(json.dumps(simulated.store.latest()))
    return {
        "code": code, "rows": simulated.epochs * STEPS_PER_EPOCH * len(STUDENTS), "epochs": simulated.epochs, **timings(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mib": baseline_mib, "manifest_bytes": manifest_bytes,
    }


def interleaved(rounds: int = 9) -> dict[int, dict[str, Any]]:
    """The new code's checkpoints at every size, timed in interleaved rounds in one process (load hits all alike)."""
    with tempfile.TemporaryDirectory(prefix="long-run-") as directory:
        runs = {rows: SimulatedRun("new", rows, f"{directory}/{rows}", rounds) for rows in ROWS}
        seconds: dict[int, list[tuple[float, float]]] = {rows: [] for rows in ROWS}
        for _ in range(rounds):
            for rows, simulated in runs.items():
                seconds[rows].append(simulated.next_checkpoint())
    return {rows: timings(values) for rows, values in seconds.items()}


def child_run(*args: str) -> str:
    """Run this file with ``args`` in a fresh process; its last line of output."""
    child = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    return child.stdout.strip().splitlines()[-1]


def run_all() -> list[dict[str, Any]]:
    cells = []
    for rows in ROWS:
        for code in ("new", "old"):
            started = time.perf_counter()
            cell = json.loads(child_run("--cell", code, str(rows)))
            print(f"{code} {cell['rows']:>9,} rows: checkpoint {cell['checkpoint_seconds']:.3f} s "
                  f"(CPU {cell['checkpoint_cpu_seconds']:.3f} s), peak RSS "
                  f"{cell['peak_rss_mib']:.0f} MiB, manifest {cell['manifest_bytes']:,} B ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            cells.append(cell)
    return cells


def render(cells: list[dict[str, Any]], rounds: dict[str, dict[str, Any]]) -> str:
    """The report: the new code's checkpoint time from the interleaved rounds, everything else from the cells."""
    epoch_rows = STEPS_PER_EPOCH * len(STUDENTS)
    by = {(cell["code"], nominal): cell for nominal in ROWS for cell in cells if cell["rows"] >= nominal > cell["rows"] - epoch_rows}
    lines = [
        "# Long runs: one epoch-end checkpoint and the driver's memory as the step log grows",
        "",
        f"8 students, {STEPS_PER_EPOCH} steps per epoch, a checkpoint at every epoch's end (rows rounded up to whole "
        "epochs); the real RunDirectory, CheckpointStore and Storage on a local disk (each file fsynced). Old: "
        f"run_directory.py of {OLD_COMMIT}. Seconds: the fastest of the repeated checkpoints, wall (CPU in brackets); the "
        "new code's sizes are timed in interleaved rounds in one process, the old code's in its cells. Peak RSS: a fresh "
        "process per cell (its baseline after imports in brackets).",
        "",
        "| step rows | new checkpoint s (CPU s) | old checkpoint s (CPU s) | old / new | new peak RSS MiB | old peak RSS MiB "
        "| new manifest B | old manifest B |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for count in ROWS:
        new, old, timed = by[("new", count)], by[("old", count)], rounds[str(count)]
        lines.append(
            f"| {new['rows']:,} | {timed['checkpoint_seconds']:.3f} ({timed['checkpoint_cpu_seconds']:.3f}) | "
            f"{old['checkpoint_seconds']:.3f} ({old['checkpoint_cpu_seconds']:.3f}) | "
            f"{old['checkpoint_seconds'] / timed['checkpoint_seconds']:.0f}x | {new['peak_rss_mib']:.0f} ({new['baseline_rss_mib']:.0f}) | "
            f"{old['peak_rss_mib']:.0f} ({old['baseline_rss_mib']:.0f}) | {new['manifest_bytes']:,} | {old['manifest_bytes']:,} |"
        )
    first, last = ROWS[0], ROWS[-1]
    for code in ("new", "old"):
        low, high = by[(code, first)], by[(code, last)]
        if code == "new":
            low, high = {**low, **rounds[str(first)]}, {**high, **rounds[str(last)]}
        lines += ["", (
            f"{code}: from {low['rows']:,} to {high['rows']:,} rows a checkpoint takes "
            f"{high['checkpoint_seconds'] / low['checkpoint_seconds']:.2f}x as long "
            f"({high['checkpoint_cpu_seconds'] / low['checkpoint_cpu_seconds']:.2f}x the CPU time) and the peak RSS is "
            f"{high['peak_rss_mib'] / low['peak_rss_mib']:.2f}x "
            f"(growth over the baseline: {low['peak_rss_mib'] - low['baseline_rss_mib']:.0f} -> "
            f"{high['peak_rss_mib'] - high['baseline_rss_mib']:.0f} MiB)."
        )]
    lines += ["", "Command: `.venv/bin/python benchmarks/long_run.py` (2-core machine, shared with other work while it ran)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs=2, metavar=("CODE", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.cell[0], int(args.cell[1]))))
        return
    if args.interleaved:
        print(json.dumps(interleaved()))
        return
    cells = run_all()
    rounds = json.loads(child_run("--interleaved"))
    for count in ROWS:
        print(f"new {count:>9,} rows, interleaved: checkpoint {rounds[str(count)]['checkpoint_seconds']:.3f} s "
              f"(CPU {rounds[str(count)]['checkpoint_cpu_seconds']:.3f} s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_run.json").write_text(json.dumps({"students": len(STUDENTS), "steps_per_epoch": STEPS_PER_EPOCH,
                                                       "old_commit": OLD_COMMIT, "cells": cells,
                                                       "new_interleaved": rounds}, indent=2) + "\n")
    (RESULTS / "long_run.md").write_text(render(cells, rounds))
    print(render(cells, rounds))


if __name__ == "__main__":
    main()
