"""What keeping the Prometheus metrics costs the coordinator per step: the core alone vs the metered core.

Same frames, same batched computation, one torch thread; only the metrics updates differ.
Writes benchmarks/results/metrics_overhead.json and .md.
"""

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from rdml_dist.config import parse_config
from rdml_dist.coordinator_core.coordinator import CohortCoordinator
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.messages import LogitsFrame, StudentInfo
from rdml_dist.coordinator_core.metered_coordinator import MeteredCoordinator
from rdml_dist.metrics import CohortMetrics, LockedRegistry

RESULTS = Path(__file__).parent / "results"


def paired_compute_seconds(cores: list[CohortCoordinator], names: list[str], batch: int, classes: int, steps: int) -> list[float]:
    """Median ``compute()`` time of each core over the same frames, measured alternately step by step.

    Alternating the order every step spreads the machine's noise evenly over the cores compared;
    the first five steps are warm-up.
    """
    plan = batch_plan(batch * steps, batch, cores[0].config.seed, 0)
    for core in cores:
        for name in names:
            core.register(StudentInfo(name, batch * steps, 10, classes, steps))
    generator = torch.Generator().manual_seed(0)
    times: list[list[float]] = [[] for _ in cores]
    for step in range(steps):
        frames = [
            LogitsFrame(name, step, indices_hash(plan[step]), torch.randn(batch, classes, generator=generator), 1.0, 0, batch)
            for name in names
        ]
        order = list(range(len(cores))) if step % 2 == 0 else list(reversed(range(len(cores))))
        for position in order:
            for frame in frames:
                cores[position].submit(frame)
            started = time.perf_counter()
            cores[position].compute()
            times[position].append(time.perf_counter() - started)
    return [statistics.median(series[5:]) for series in times]


def measure(students: int, batch: int, classes: int, steps: int) -> dict[str, float]:
    names = [f"s{index}" for index in range(students)]
    config = parse_config({"students": [{"model": "mlp", "name": name} for name in names], "training": {"batch_size": batch}})
    metered = MeteredCoordinator(config, CohortMetrics.for_config(config, LockedRegistry(threading.Lock())))
    plain_seconds, metered_seconds = paired_compute_seconds([CohortCoordinator(config), metered], names, batch, classes, steps)
    return {"students": students, "batch": batch, "classes": classes, "core_seconds": plain_seconds, "metered_seconds": metered_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[2, 8, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(students, 128, 100, args.steps) for students in args.cohorts]
    machine = f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics_overhead.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Metrics overhead (benchmarks/metrics_overhead.py)",
        "",
        f"Machine: {machine}, one torch thread. Command: `.venv/bin/python benchmarks/metrics_overhead.py`.",
        "",
        "| K | B×C | core compute ms | metered compute ms | metrics cost ms per step |",
        "|---|-----|-----------------|--------------------|--------------------------|",
    ]
    for row in rows:
        lines.append(
            f"| {row['students']} | {row['batch']}×{row['classes']} | {1000 * row['core_seconds']:.3f} | "
            f"{1000 * row['metered_seconds']:.3f} | {1000 * (row['metered_seconds'] - row['core_seconds']):.3f} |"
        )
    (RESULTS / "metrics_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
