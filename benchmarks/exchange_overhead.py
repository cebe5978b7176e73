"""Exchange overhead of the Ray engine, measured side by side in one run.

1. Transport only: K sender actors push B×C logits frames through the real CoordinatorActor in
   lock-step (no model), so the per-step time is the exchange itself; next to it, the batched
   mimicry computation alone (in process) for the same K×B×C.
2. Whole engine: the packaged digits cohort trained for a few epochs by the local engine and by
   the Ray engine with the same config (1 torch thread per student), per-step time of each and
   the Ray run's per-step breakdown (compute, round trip, wait for the slowest peer, overhead).

Writes benchmarks/results/exchange_overhead.{json,md}. Run (2 min on 2 cores; --render-only rewrites
the report from the JSON):
    .venv/bin/python benchmarks/exchange_overhead.py
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import ray  # noqa: E402  (must follow the loopback setting)
import torch  # noqa: E402

from rdml_dist.config import ExperimentConfig, load_config, parse_config  # noqa: E402
from rdml_dist.data import batch_plan, indices_hash  # noqa: E402
from rdml_dist.divergence import mimicry_gradients  # noqa: E402
from rdml_dist.engines.local import train_local  # noqa: E402
from rdml_dist.engines.ray_actors import CoordinatorActor  # noqa: E402
from rdml_dist.engines.ray_engine import train_ray  # noqa: E402
from rdml_dist.messages import LogitsFrame, StudentInfo  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@ray.remote(num_cpus=0.1)
class FrameSender:
    """A stand-in student with no model: sends fixed logits each step and times the round trip."""

    def __init__(self, name: str, hashes: list[str], batch: int, classes: int) -> None:
        torch.set_num_threads(1)
        self.name = name
        self.hashes = hashes
        self.logits = torch.randn(batch, classes)

    def ready(self) -> bool:
        """Returns once the actor is constructed, so actor start-up stays out of the timing."""
        return True

    def run(self, coordinator: "ray.actor.ActorHandle") -> list[float]:
        round_trips = []
        for step, batch_hash in enumerate(self.hashes):
            frame = LogitsFrame(self.name, step, batch_hash, self.logits, ce_loss=1.0, correct=0, labelled=1, correct_clean=0)
            sent = time.perf_counter()
            ray.get(coordinator.exchange.remote(frame))
            round_trips.append(time.perf_counter() - sent)
        return round_trips


def transport_only(students: int, steps: int, batch: int, classes: int) -> dict[str, float]:
    """Per-step exchange time with K senders and no model, next to the coordinator's computation alone."""
    names = [f"s{index}" for index in range(students)]
    config = parse_config(
        {
            "students": [{"model": "mlp", "name": name} for name in names],
            "training": {"batch_size": batch, "epochs": 1},
        }
    )
    plan = batch_plan(batch * steps, batch, config.seed, 0, drop_last=True)
    hashes = [indices_hash(indices) for indices in plan]
    coordinator = CoordinatorActor.remote(config.model_dump(mode="json"))
    ray.get([coordinator.register.remote(StudentInfo(name, batch * steps, 1, classes, steps)) for name in names])
    senders = [FrameSender.remote(name, hashes, batch, classes) for name in names]
    ray.get([sender.ready.remote() for sender in senders])
    started = time.perf_counter()
    round_trips = ray.get([sender.run.remote(coordinator) for sender in senders])
    wall = time.perf_counter() - started
    for actor in [*senders, coordinator]:
        ray.kill(actor)
    stacked = torch.randn(students, batch, classes)
    torch.set_num_threads(1)
    compute = []
    for _ in range(50):
        begun = time.perf_counter()
        mimicry_gradients(stacked, alpha=2.0)
        compute.append(time.perf_counter() - begun)
    steady = [value for series in round_trips for value in series[5:]]
    return {
        "students": students,
        "batch": batch,
        "classes": classes,
        "steps": steps,
        "step_seconds": wall / steps,
        "median_round_trip_seconds": statistics.median(steady),
        "median_mimicry_compute_seconds": statistics.median(compute),
    }


def engine_comparison(epochs: int) -> dict[str, object]:
    """The packaged digits cohort: local engine vs Ray engine, same config, one torch thread per student."""
    overrides = [f"training.epochs={epochs}", "runtime.torch_threads=1"]
    config: ExperimentConfig = load_config(None, overrides)
    timings = {}
    summaries = {}
    with tempfile.TemporaryDirectory() as scratch:
        for engine, train in (("local", train_local), ("ray", train_ray)):
            began = time.perf_counter()
            run = train(config, Path(scratch) / engine, False)
            run.finish()
            elapsed = time.perf_counter() - began
            steps = sum(entry["students"][config.student_names()[0]]["steps"] for entry in run.epochs)
            training_seconds = sum(entry["seconds"] for entry in run.epochs)
            samples = sum(row.rows for row in run.rows if row.student == config.student_names()[0])  # each student sees each
            timings[engine] = {
                "wall_seconds": elapsed,
                "training_seconds": training_seconds,
                "steps": steps,
                "samples_per_second": samples / training_seconds,
            }
            summaries[engine] = run.summary()
    per_step = {engine: values["training_seconds"] / values["steps"] for engine, values in timings.items()}
    breakdown = {
        name: {key: values[key] for key in values if key.startswith("mean_")}
        for name, values in summaries["ray"].items()
        if name != "ensemble"
    }
    return {
        "epochs": epochs,
        "students": config.student_names(),
        "engines": timings,
        "seconds_per_step": per_step,
        "ray_over_local_step_time": per_step["ray"] / per_step["local"],
        "ray_breakdown": breakdown,
        "final_accuracy": {engine: summary["ensemble"]["final_val_accuracy"] for engine, summary in summaries.items()},
    }


def render_markdown(results: dict[str, object]) -> str:
    lines = [
        "# Exchange overhead (benchmarks/exchange_overhead.py)",
        "",
        f"Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/exchange_overhead.py`.",
        "",
        "## Transport only (no model): K senders, B×C float32 logits through the coordinator actor",
        "",
        "| K | B×C | ms per step (all K) | median round trip ms | batched mimicry compute ms | exchange / compute |",
        "|---|-----|---------------------|----------------------|----------------------------|--------------------|",
    ]
    for row in results["transport"]:
        lines.append(
            f"| {row['students']} | {row['batch']}×{row['classes']} | {1000 * row['step_seconds']:.2f} | "
            f"{1000 * row['median_round_trip_seconds']:.2f} | {1000 * row['median_mimicry_compute_seconds']:.3f} | "
            f"{row['step_seconds'] / row['median_mimicry_compute_seconds']:.1f}× |"
        )
    engines = results["engines"]
    lines += [
        "",
        f"## Whole engine: packaged digits cohort ({', '.join(engines['students'])}), {engines['epochs']} epochs, 1 thread per student",
        "",
        "| engine | training s | steps | ms per step | samples/s (cohort) | final ensemble acc |",
        "|--------|------------|-------|-------------|--------------------|--------------------|",
    ]
    for engine, values in engines["engines"].items():
        lines.append(
            f"| {engine} | {values['training_seconds']:.1f} | {values['steps']} | "
            f"{1000 * engines['seconds_per_step'][engine]:.1f} | {values['samples_per_second']:.0f} | "
            f"{100 * engines['final_accuracy'][engine]:.2f}% |"
        )
    lines += [
        "",
        f"Ray step time / local step time: **{engines['ray_over_local_step_time']:.2f}×** "
        "(the local engine runs the students one after another in one process; the Ray engine runs them in parallel processes).",
        "",
        "Ray engine per-step breakdown per student (means, ms):",
        "",
        "| student | compute | round trip | wait for slowest peer | exchange overhead | share of the step: waiting / exchange |",
        "|---------|---------|------------|-----------------------|-------------------|---------------------------------------|",
    ]
    step = engines["seconds_per_step"]["ray"]
    for name, values in engines["ray_breakdown"].items():
        lines.append(
            f"| {name} | {1000 * values['mean_compute_seconds']:.2f} | {1000 * values['mean_round_trip_seconds']:.2f} | "
            f"{1000 * values['mean_wait_seconds']:.2f} | {1000 * values['mean_exchange_overhead_seconds']:.2f} | "
            f"{values['mean_wait_seconds'] / step:.0%} / {values['mean_exchange_overhead_seconds'] / step:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="lock-step exchanges per transport measurement")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the engine comparison")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[2, 4, 8], help="cohort sizes K for the transport test")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the saved JSON, measuring nothing")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((RESULTS / "exchange_overhead.json").read_text())
    else:
        ray.init(num_cpus=max(8, max(args.cohorts)), include_dashboard=False)
        try:
            transport = [transport_only(k, args.steps, 128, 100) for k in args.cohorts]
        finally:
            ray.shutdown()
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, ray {ray.__version__}",
            "transport": transport,
            "engines": engine_comparison(args.epochs),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "exchange_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    (RESULTS / "exchange_overhead.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
