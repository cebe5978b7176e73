"""What a checkpoint costs as a run grows: the run directory's write path and the driver's memory at 10^4-10^6 step rows.

A simulated run of 8 students, 391 steps per epoch (the CIFAR recipe at batch 128) and a
checkpoint at every epoch's end is driven through the real ``RunDirectory``, ``CheckpointStore``
and ``Storage`` (a local directory) with made-up step records. Each (code, rows) cell runs in a
fresh process, so its peak RSS is its own. The old code is ``rdml_dist/run_directory.py`` of
commit fa1f8a3, loaded from git into a module beside the new one; its state at N rows (all rows
in memory, every epoch's entry) is built directly, since replaying its per-epoch scans would be
quadratic. Timed: one epoch-end checkpoint at N rows, i.e. ``record_epoch`` + ``write_progress``
+ ``manifest`` + ``commit`` (median of 3 for the new code, of 1-3 for the old).

    .venv/bin/python benchmarks/long_run.py            # writes benchmarks/results/long_run.{json,md}
"""

import argparse
import importlib.util
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

from rdml_dist.checkpoints import CheckpointStore
from rdml_dist.config import parse_config
from rdml_dist.coordinator import EpochEvaluation, StepRecord
from rdml_dist.storage import Storage

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
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:rdml_dist/run_directory.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp(prefix="old-run-directory-")) / "old_run_directory.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_run_directory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint(run: Any, store: CheckpointStore, epoch: int) -> tuple[float, float]:
    """The work of one epoch-end checkpoint after the chunk's records were added; returns its wall and CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    run.record_epoch(epoch, evaluation(epoch), 1.0)
    run.write_progress()
    store.commit(run.manifest((epoch + 1) * STEPS_PER_EPOCH, live=[]))
    return time.perf_counter() - started, time.process_time() - cpu


def measure(code: str, rows: int) -> dict[str, Any]:
    """One cell, in this process: reach ``rows`` step rows, then time epoch-end checkpoints."""
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    epochs = -(-rows // (STEPS_PER_EPOCH * len(STUDENTS)))
    timed = 3 if code == "new" or rows < 1_000_000 else 1
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="long-run-") as directory:
        storage = Storage(directory)
        config = parse_config({"name": "long", "students": [{"model": "mlp", "name": name} for name in STUDENTS],
                               "training": {"epochs": epochs + timed + 1}, "runtime": {"engine": "local", "run_dir": directory}})
        store = CheckpointStore(storage)
        if code == "new":
            from rdml_dist.run_directory import RunDirectory

            run = RunDirectory(storage, config, "local")
            run.write_config()
            for epoch in range(epochs - 1):
                run.add_records(chunk(epoch, rng))
                checkpoint(run, store, epoch)
        else:
            old = old_module()
            run = old.RunDirectory(storage, config, "local")
            run.write_config()
            for epoch in range(epochs - 1):  # the state the old code holds after these epochs, built without its rescans
                records = chunk(epoch, rng)
                run.add_records(records)
                run.epochs.append({"epoch": epoch, "seconds": 1.0, "alpha": 2.0, "mimicry_weight": 1.0, "ensemble_val_accuracy": 0.92,
                                   "students": {name: {**values, "val_accuracy": 0.9}
                                                for name, values in old.summarize_training(records).items()}})
        seconds, cpu_seconds = [], []
        for epoch in range(epochs - 1, epochs - 1 + timed):
            run.add_records(chunk(epoch, rng))
            wall, cpu = checkpoint(run, store, epoch)
            seconds.append(wall)
            cpu_seconds.append(cpu)
            store.prune(2)
        manifest_bytes = len(json.dumps(store.latest()))
    return {
        "code": code, "rows": epochs * STEPS_PER_EPOCH * len(STUDENTS), "epochs": epochs,
        "checkpoint_seconds": statistics.median(seconds), "checkpoint_seconds_all": seconds,
        "checkpoint_cpu_seconds": statistics.median(cpu_seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mib": baseline_mib, "manifest_bytes": manifest_bytes,
    }


def run_all() -> list[dict[str, Any]]:
    cells = []
    for rows in ROWS:
        for code in ("new", "old"):
            started = time.perf_counter()
            child = subprocess.run([sys.executable, __file__, "--cell", code, str(rows)], capture_output=True, text=True,
                                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            cell = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{code} {cell['rows']:>9,} rows: checkpoint {cell['checkpoint_seconds']:.3f} s "
                  f"(CPU {cell['checkpoint_cpu_seconds']:.3f} s), peak RSS "
                  f"{cell['peak_rss_mib']:.0f} MiB, manifest {cell['manifest_bytes']:,} B ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            cells.append(cell)
    return cells


def render(cells: list[dict[str, Any]]) -> str:
    by = {(cell["code"], cell["rows"]): cell for cell in cells}
    rows = sorted({cell["rows"] for cell in cells})
    lines = [
        "# Long runs: one epoch-end checkpoint and the driver's memory as the step log grows",
        "",
        f"8 students, {STEPS_PER_EPOCH} steps per epoch, a checkpoint at every epoch's end; the real RunDirectory, "
        "CheckpointStore and Storage on a local disk. Old: run_directory.py of " + OLD_COMMIT + ". "
        "Peak RSS of a fresh process per cell (its baseline after imports in brackets).",
        "",
        "| step rows | new checkpoint s (CPU s) | old checkpoint s (CPU s) | old / new | new peak RSS MiB | old peak RSS MiB "
        "| new manifest B | old manifest B |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for count in rows:
        new, old = by[("new", count)], by[("old", count)]
        lines.append(
            f"| {count:,} | {new['checkpoint_seconds']:.3f} ({new['checkpoint_cpu_seconds']:.3f}) | "
            f"{old['checkpoint_seconds']:.3f} ({old['checkpoint_cpu_seconds']:.3f}) | "
            f"{old['checkpoint_seconds'] / new['checkpoint_seconds']:.1f}x | {new['peak_rss_mib']:.0f} ({new['baseline_rss_mib']:.0f}) | "
            f"{old['peak_rss_mib']:.0f} ({old['baseline_rss_mib']:.0f}) | {new['manifest_bytes']:,} | {old['manifest_bytes']:,} |"
        )
    first, last = rows[0], rows[-1]
    for code in ("new", "old"):
        low, high = by[(code, first)], by[(code, last)]
        lines.append("")
        lines.append(
            f"{code}: from {first:,} to {last:,} rows a checkpoint takes "
            f"{high['checkpoint_seconds'] / low['checkpoint_seconds']:.2f}x as long "
            f"({high['checkpoint_cpu_seconds'] / low['checkpoint_cpu_seconds']:.2f}x the CPU time) and the peak RSS is "
            f"{high['peak_rss_mib'] / low['peak_rss_mib']:.2f}x "
            f"(growth over the baseline: {low['peak_rss_mib'] - low['baseline_rss_mib']:.0f} -> "
            f"{high['peak_rss_mib'] - high['baseline_rss_mib']:.0f} MiB)."
        )
    lines += ["", "Command: `.venv/bin/python benchmarks/long_run.py` (2-core machine, shared with other work while it ran)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs=2, metavar=("CODE", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.cell[0], int(args.cell[1]))))
        return
    cells = run_all()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_run.json").write_text(json.dumps({"students": len(STUDENTS), "steps_per_epoch": STEPS_PER_EPOCH,
                                                       "old_commit": OLD_COMMIT, "cells": cells}, indent=2) + "\n")
    (RESULTS / "long_run.md").write_text(render(cells))
    print(render(cells))


if __name__ == "__main__":
    main()
