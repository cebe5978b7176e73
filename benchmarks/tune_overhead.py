"""What running a cohort as a Ray Tune trial costs against ``rdml-dist train`` of the same config.

Both run in one local Ray session (started once, not timed), alternately, ``--rounds`` times each:
- train: the code ``rdml-dist train`` runs (a new session, TensorBoard and plots observers, the Ray engine);
- trial: a one-trial sweep of the same experiment (``run_sweep``), the cohort in the trial's placement group.

Each run's wall time is split into training (from the first epoch's results to the last's: the
epochs after the first) and the rest, start-up (actors, data, Tune's trial actor and placement
group, the first epoch, then result files and teardown). Writes benchmarks/results/tune_overhead.json and .md.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import ray  # noqa: E402

from rdml_dist.config import parse_config  # noqa: E402
from rdml_dist.engines import run_session  # noqa: E402
from rdml_dist.engines.observers import standard_observers  # noqa: E402
from rdml_dist.engines.session import new_session  # noqa: E402
from rdml_dist.tune.runner import run_sweep  # noqa: E402
from rdml_dist.tune.sweep import SweepConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def experiment(epochs: int) -> dict[str, Any]:
    """Digits, an MLP and a CNN on one torch thread each (the embedded default's data, smaller cohort)."""
    return {
        "name": "tune-overhead", "seed": 0, "data": {"name": "digits"},
        "students": [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}],
        "training": {"epochs": epochs, "batch_size": 64, "last_epochs_reported": 1},
        "runtime": {"engine": "ray", "torch_threads": 1, "coordinator": {"cpus": 0.5}},
        "monitoring": {"port": 0}, "rpc": {"port": 0},
    }


class EpochClock:
    """A RunObserver noting when each epoch's results are committed."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def on_epoch(self, entry: dict[str, Any]) -> None:
        self.at.append(time.perf_counter())

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        pass


def split(total: float, training: float) -> dict[str, float]:
    return {"total_s": total, "training_s": training, "startup_s": total - training}


def time_train(raw: dict[str, Any], directory: Path) -> dict[str, float]:
    """``train_cohort``'s own path (TensorBoard and plots observers, then the engine), plus a clock observer."""
    clock = EpochClock()
    started = time.perf_counter()
    with new_session(parse_config(raw), directory) as session, standard_observers(session) as observers:
        run_session(session, show_progress=False, observers=[*observers, clock])
    return split(time.perf_counter() - started, clock.at[-1] - clock.at[0])


def time_trial(raw: dict[str, Any], directory: Path) -> dict[str, float]:
    sweep = SweepConfig.model_validate({"name": "trial", "base": raw, "space": {"seed": {"grid": [raw["seed"]]}},
                                        "storage": str(directory)})
    started = time.perf_counter()
    results = run_sweep(sweep, raw)
    total = time.perf_counter() - started
    reported = results[0].metrics_dataframe["time_total_s"]  # Tune's clock at each epoch's report
    return split(total, float(reported.iloc[-1] - reported.iloc[0]))


def render(report: dict[str, Any]) -> str:
    rows = report["rounds"]
    lines = [
        "# A cohort as a Ray Tune trial vs `rdml-dist train`",
        "",
        f"{report['epochs']} epochs of digits, MLP + CNN (one torch thread each), {report['machine']}; "
        f"one local Ray session, runs alternated, {len(rows)} rounds. Command: `{report['command']}`.",
        "",
        "| round | train total s | train start-up + epoch 1 s | train epochs 2.. s | trial total s | trial start-up + epoch 1 s | trial epochs 2.. s |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(rows, 1):
        train, trial = row["train"], row["trial"]
        lines.append(f"| {index} | {train['total_s']:.1f} | {train['startup_s']:.1f} | {train['training_s']:.1f} | "
                     f"{trial['total_s']:.1f} | {trial['startup_s']:.1f} | {trial['training_s']:.1f} |")
    ratios = report["median_ratio"]
    lines += ["", f"Median ratio trial / train: training {ratios['training']:.2f}x, start-up {ratios['startup']:.2f}x, "
                  f"total {ratios['total']:.2f}x (aim: at most 1.2x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    raw = experiment(args.epochs)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rounds = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for index in range(args.rounds):
                train = time_train(raw, Path(scratch) / f"train-{index}")
                trial = time_trial(raw, Path(scratch) / f"trial-{index}")
                rounds.append({"train": train, "trial": trial})
                print(json.dumps(rounds[-1]), flush=True)
    finally:
        ray.shutdown()
    median_ratio = {key: statistics.median(row["trial"][f"{key}_s"] / row["train"][f"{key}_s"] for row in rounds)
                    for key in ("training", "startup", "total")}
    report = {"epochs": args.epochs, "rounds": rounds, "median_ratio": median_ratio,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "command": f".venv/bin/python benchmarks/tune_overhead.py --epochs {args.epochs} --rounds {args.rounds}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_overhead.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "tune_overhead.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
