"""Does Rényi mutual learning help on real data? Independent vs DML (KL) vs RDML on scikit-learn's digits.

A heterogeneous cohort of three (MLP, small CNN, ResNet-20) is trained by the in-process reference
engine (numerically identical to the Ray engine) in three settings — clean labels, 30% symmetric
label noise, and semi-supervised (50% of the training labels hidden) — with six mimicry methods:
independent (α = 0, no mimicry), DML (KL, α → 1), RDML with α ∈ {0.5, 2, 5}, and RDML with α
cosine-annealed from 2 to 0 (as the official RDML code does). Every combination runs for every
seed, one fresh process per run, two at a time; methods share the seed, so for a given seed they
start from the same split, noise, initialisation and batch order and differ only by the mimicry term.

Writes JSON (every run's per-epoch numbers, aggregates, command, machine, wall time), a Markdown
table with a verdict generated from the numbers, and two PNG plots to ``--out``. Run:
    .venv/bin/python benchmarks/mutual_learning_study.py            # full: 5 seeds x 15 epochs, 22 min on 2 cores
    .venv/bin/python benchmarks/mutual_learning_study.py --quick    # 2 seeds x 4 epochs, 4 min
    .venv/bin/python benchmarks/mutual_learning_study.py --render-only   # the Markdown and plots again from the JSON
"""

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STUDENTS: list[dict[str, Any]] = [
    {"name": "mlp", "model": "mlp", "options": {"hidden": [128, 64]}},
    {"name": "cnn", "model": "small_cnn", "options": {"width": 16}},
    {"name": "resnet20", "model": "resnet20"},
]
MEMBERS = [student["name"] for student in STUDENTS] + ["ensemble"]
STUDENT_FIELDS = ("val_accuracy", "train_accuracy", "train_accuracy_clean", "train_ce", "train_mimicry")


@dataclass(frozen=True)
class Setting:
    """A data regime: which training labels are wrong or hidden (validation labels are always clean)."""

    key: str
    title: str
    label_noise: float
    unlabeled_fraction: float


@dataclass(frozen=True)
class Method:
    """A mimicry term; ``x`` places it on the α axis of the plot (DML at α = 1, cosine after α = 5)."""

    key: str
    label: str
    x: float
    mimicry: dict[str, Any]


SETTINGS = [
    Setting("clean", "clean labels", 0.0, 0.0),
    Setting("noisy", "30% symmetric label noise", 0.3, 0.0),
    Setting("semi", "semi-supervised (50% labels hidden)", 0.0, 0.5),
]
METHODS = [
    Method("independent", "independent (α=0)", 0.0, {"divergence": "renyi", "alpha": 0.0}),
    Method("rdml_0.5", "RDML α=0.5", 0.5, {"divergence": "renyi", "alpha": 0.5}),
    Method("dml", "DML (KL, α=1)", 1.0, {"divergence": "kl"}),
    Method("rdml_2", "RDML α=2", 2.0, {"divergence": "renyi", "alpha": 2.0}),
    Method("rdml_5", "RDML α=5", 5.0, {"divergence": "renyi", "alpha": 5.0}),
    Method("rdml_cosine", "RDML α: 2→0 cosine", 6.0,
           {"divergence": "renyi", "alpha": 2.0, "alpha_schedule": {"kind": "cosine", "floor": 0.0}}),
]
LABELS = {method.key: method.label for method in METHODS}
RDML_KEYS = ("rdml_0.5", "rdml_2", "rdml_5", "rdml_cosine")


def run_config(setting: Setting, method: Method, seed: int, epochs: int, run_dir: str) -> dict[str, Any]:
    """The raw experiment config of one run (packaged digits defaults, 1 torch thread, no servers)."""
    return {
        "name": f"study-{setting.key}-{method.key}-{seed}",
        "seed": seed,
        "data": {"name": "digits", "val_fraction": 0.2, "label_noise": setting.label_noise,
                 "unlabeled_fraction": setting.unlabeled_fraction},
        "students": STUDENTS,
        "training": {"epochs": epochs, "batch_size": 64,
                     "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                     "lr_schedule": {"name": "cosine"}, "last_epochs_reported": min(3, epochs)},
        "mimicry": {"temperature": 1.0, "weight": 1.0, "mode": "pairwise", **method.mimicry},
        "runtime": {"engine": "local", "run_dir": run_dir, "torch_threads": 1},
        "monitoring": {"enabled": False},
        "rpc": {"enabled": False},
    }


def train_one(job: tuple[Setting, Method, int, int]) -> dict[str, Any]:
    """Train one cohort in this (fresh) worker process; returns its per-epoch numbers and summary."""
    from rdml_dist.config import parse_config
    from rdml_dist.engines.local import train_local

    setting, method, seed, epochs = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rdml-study-") as run_dir:
        train_local(parse_config(run_config(setting, method, seed, epochs, run_dir)), run_dir, show_progress=False).finish()
        results = json.loads(Path(run_dir, "results.json").read_text())
    epoch_rows = [
        {"epoch": row["epoch"], "alpha": row["alpha"], "ensemble_val_accuracy": row["ensemble_val_accuracy"],
         "students": {name: {field: values.get(field) for field in STUDENT_FIELDS} for name, values in row["students"].items()}}
        for row in results["epochs"]
    ]
    summary = {member: {key: results["summary"][member][key] for key in ("final_val_accuracy", "best_val_accuracy")}
               for member in MEMBERS}
    return {"setting": setting.key, "method": method.key, "seed": seed, "seconds": time.perf_counter() - started,
            "summary": summary, "epochs": epoch_rows}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value), in percent."""
    scaled = [100.0 * value for value in values]
    return {"mean": statistics.fmean(scaled), "std": statistics.stdev(scaled) if len(scaled) > 1 else 0.0, "n": len(scaled)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting and method: final/best val accuracy of every member, final train accuracies, ensemble curve."""
    table: dict[str, dict[str, Any]] = {}
    for setting in SETTINGS:
        table[setting.key] = {}
        for method in METHODS:
            group = sorted((run for run in runs if run["setting"] == setting.key and run["method"] == method.key),
                           key=lambda run: run["seed"])
            if not group:
                continue
            entry: dict[str, Any] = {"seeds": [run["seed"] for run in group]}
            for member in MEMBERS:
                entry[member] = {metric: mean_std([run["summary"][member][f"{metric}_val_accuracy"] for run in group])
                                 for metric in ("final", "best")}
            for name in MEMBERS[:-1]:
                for field in ("train_accuracy", "train_accuracy_clean"):
                    entry[name][f"final_{field}"] = mean_std([run["epochs"][-1]["students"][name][field] for run in group])
            entry["ensemble_curve"] = [mean_std([run["epochs"][index]["ensemble_val_accuracy"] for run in group])
                                       for index in range(len(group[0]["epochs"]))]
            table[setting.key][method.key] = entry
    return table


def paired_difference(runs: list[dict[str, Any]], setting: str, member: str, better: str, worse: str) -> dict[str, float]:
    """Per-seed difference of final val accuracy (pp) between two methods: mean, std and seeds won."""
    def by_seed(method: str) -> dict[int, float]:
        return {run["seed"]: 100.0 * run["summary"][member]["final_val_accuracy"]
                for run in runs if run["setting"] == setting and run["method"] == method}

    first, second = by_seed(better), by_seed(worse)
    differences = [first[seed] - second[seed] for seed in sorted(first.keys() & second.keys())]
    return {"mean": statistics.fmean(differences), "std": statistics.stdev(differences) if len(differences) > 1 else 0.0,
            "wins": sum(difference > 0 for difference in differences), "n": len(differences)}


def cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def comparison(table: dict[str, Any], runs: list[dict[str, Any]], setting: str, member: str, best: str, other: str) -> str:
    """One comparison of the best method with another: gap of the means, whether it exceeds one std, paired wins."""
    if best == other:
        return ""
    gap = table[best][member]["final"]["mean"] - table[other][member]["final"]["mean"]
    spread = max(table[best][member]["final"]["std"], table[other][member]["final"]["std"])
    paired = paired_difference(runs, setting, member, best, other)
    beyond = "more than one std" if gap > spread else "within one std"
    return (f"{gap:+.2f} pp over {LABELS[other]} ({beyond}, std {spread:.2f}; "
            f"better on {paired['wins']}/{paired['n']} seeds)")


def verdict(table: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    """Plain-language findings computed from the numbers: best method per member and setting, and RDML vs DML/independent."""
    lines = []
    for setting in SETTINGS:
        methods = table[setting.key]
        lines.append(f"**{setting.title}.**")
        for member in MEMBERS:
            best = max(methods, key=lambda key: methods[key][member]["final"]["mean"])
            against = [text for text in (comparison(methods, runs, setting.key, member, best, "independent"),
                                         comparison(methods, runs, setting.key, member, best, "dml")) if text]
            lines.append(f"- {member}: best final accuracy with {LABELS[best]} "
                         f"({cell(methods[best][member]['final'])}%)" + (f"; {'; '.join(against)}." if against else "."))
        best_rdml = max(RDML_KEYS, key=lambda key: methods[key]["ensemble"]["final"]["mean"])
        rdml_vs_dml = methods[best_rdml]["ensemble"]["final"]["mean"] - methods["dml"]["ensemble"]["final"]["mean"]
        spread = max(methods[best_rdml]["ensemble"]["final"]["std"], methods["dml"]["ensemble"]["final"]["std"])
        best_mutual = max((key for key in methods if key != "independent"), key=lambda key: methods[key]["ensemble"]["final"]["mean"])
        mutual_gap = methods[best_mutual]["ensemble"]["final"]["mean"] - methods["independent"]["ensemble"]["final"]["mean"]
        mutual_spread = max(methods[best_mutual]["ensemble"]["final"]["std"], methods["independent"]["ensemble"]["final"]["std"])
        if mutual_gap > mutual_spread:
            mutual = f"beats independent training beyond seed noise ({LABELS[best_mutual]}, {mutual_gap:+.2f} pp)"
        elif mutual_gap > 0:
            mutual = f"is ahead of independent training only within seed noise ({LABELS[best_mutual]}, {mutual_gap:+.2f} pp)"
        else:
            mutual = f"does not beat independent training ({LABELS[best_mutual]}, {mutual_gap:+.2f} pp)"
        if rdml_vs_dml > spread:
            judgement = "RDML helps the ensemble beyond seed noise here"
        elif rdml_vs_dml > 0:
            judgement = "RDML is ahead of DML only within seed noise here (no clear gain)"
        else:
            judgement = "RDML does not beat DML here"
        lines.append(f"- Ensemble, best RDML variant ({LABELS[best_rdml]}) vs DML: {rdml_vs_dml:+.2f} pp "
                     f"(largest std {spread:.2f}): {judgement}; for the ensemble, the best mutual-learning method {mutual}.")
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The tables (per setting; memorisation under noise) and the verdict."""
    table, runs = report["aggregates"], report["runs"]
    header = " | ".join(f"{member} final | {member} best" for member in MEMBERS)
    cohort = ", ".join(f"{student['name']} ({student['model']} {student.get('options', {})})" for student in STUDENTS)
    lines = [
        f"# Mutual-learning study on scikit-learn digits ({report['mode']} mode)",
        "",
        f"Cohort: {cohort}; "
        f"{report['epochs']} epochs, batch 64, SGD (Nesterov, lr 0.05, cosine, wd 5e-4), τ = 1, λ = 1, pairwise "
        f"targets, simultaneous updates; validation 20% of digits (clean labels). Seeds {report['seeds']} "
        f"(each seed fixes split, noise, initialisation and batch order, shared by all methods). "
        "Label noise replaces a label by a uniformly random *other* class; hidden labels get mimicry only.",
        "",
        f"Machine: {report['machine']['cpus']} CPU cores, Python {report['machine']['python']}, torch "
        f"{report['machine']['torch']}; {report['workers']} worker processes, 1 torch thread each. "
        f"Command: `{report['command']}`. Wall time {report['wall_seconds'] / 60:.1f} min for {len(runs)} runs.",
        "",
        "Validation accuracy in %, mean ± sample std over seeds; *final* = last epoch, *best* = best epoch "
        "(an optimistic, validation-selected number).",
        "",
    ]
    for setting in SETTINGS:
        lines += [f"## {setting.title}", "", f"| method | {header} |", "|---" * (1 + 2 * len(MEMBERS)) + "|"]
        for method in METHODS:
            entry = table[setting.key][method.key]
            row = " | ".join(f"{cell(entry[m]['final'])} | {cell(entry[m]['best'])}" for m in MEMBERS)
            lines.append(f"| {method.label} | {row} |")
        lines.append("")
    lines += [
        "## Memorisation under 30% label noise: final train accuracy (%) against the noisy and the clean labels",
        "",
        "Against the noisy labels a model can at most reach 70% by learning the true classes; above that it has "
        "memorised wrong labels, and its accuracy against the clean labels drops.",
        "",
        "| method | " + " | ".join(f"{name} vs noisy | {name} vs clean" for name in MEMBERS[:-1]) + " |",
        "|---" * (1 + 2 * (len(MEMBERS) - 1)) + "|",
    ]
    for method in METHODS:
        entry = table["noisy"][method.key]
        row = " | ".join(f"{cell(entry[n]['final_train_accuracy'])} | {cell(entry[n]['final_train_accuracy_clean'])}"
                         for n in MEMBERS[:-1])
        lines.append(f"| {method.label} | {row} |")
    lines += [
        "",
        "## Verdict (generated from the numbers above)",
        "",
        "\"More than one std\" means the gap of the means exceeds the larger of the two methods' seed std; "
        "\"better on k/n seeds\" compares the two methods seed by seed (same split, noise and initialisation). "
        "The best of four RDML variants is picked after the fact, which favours RDML slightly.",
        "",
        *verdict(table, runs),
        "Plots: `" + report["plots"][0] + "` (final accuracy vs α), `" + report["plots"][1] + "` (ensemble learning curves).",
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_alpha(table: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per setting: final val accuracy (mean ± std) of every member against the method's α."""
    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(5.2 * len(SETTINGS), 4.4), sharey=False)
    positions = list(range(len(METHODS)))
    for axis, setting in zip(axes, SETTINGS):
        for offset, member in enumerate(MEMBERS):
            means = [table[setting.key][method.key][member]["final"]["mean"] for method in METHODS]
            stds = [table[setting.key][method.key][member]["final"]["std"] for method in METHODS]
            shifted = [position + 0.06 * (offset - 1.5) for position in positions]
            axis.errorbar(shifted, means, yerr=stds, marker="o", capsize=3,
                          linewidth=2.4 if member == "ensemble" else 1.2, label=member)
        axis.set_xticks(positions, ["indep.\nα=0", "α=0.5", "DML\nα=1", "α=2", "α=5", "cosine\n2→0"])
        axis.set_title(setting.title)
        axis.set_ylabel("final val accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    figure.suptitle("Digits, cohort MLP + CNN + ResNet-20: final validation accuracy vs mimicry α (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_learning_curves(table: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per setting: ensemble val accuracy per epoch, mean over seeds, one line per method."""
    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(5.2 * len(SETTINGS), 4.4))
    for axis, setting in zip(axes, SETTINGS):
        for method in METHODS:
            curve = table[setting.key][method.key]["ensemble_curve"]
            axis.plot(range(1, len(curve) + 1), [point["mean"] for point in curve], marker=".", label=method.label)
        axis.set_title(setting.title)
        axis.set_xlabel("epoch")
        axis.set_ylabel("ensemble val accuracy (%)")
        axis.set_ylim(bottom=max(0.0, min(point["mean"] for entry in table[setting.key].values()
                                          for point in entry["ensemble_curve"][1:]) - 2))
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle("Digits: ensemble validation accuracy per epoch (mean over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds x 4 epochs (a few minutes); writes study_*quick* files")
    parser.add_argument("--seeds", type=int, help="number of seeds, 0..N-1 (default 5, quick 2)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 15, quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default benchmarks/results)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown and plots from the JSON of an earlier run")
    args = parser.parse_args()
    if args.render_only:
        tag = "_quick" if args.quick else ""
        report = json.loads((args.out / f"study_digits{tag}.json").read_text())
        write_report(report, args.out, tag)
        return
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    epochs = args.epochs or (4 if args.quick else 15)
    tag = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)

    jobs = [(setting, method, seed, epochs) for seed in seeds for setting in SETTINGS for method in METHODS]
    started = time.perf_counter()
    runs = []
    # spawn + one task per child: every run starts in a fresh interpreter, as a user's run would
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for done, run in enumerate(pool.imap_unordered(train_one, jobs), start=1):
            runs.append(run)
            ensemble = 100.0 * run["summary"]["ensemble"]["final_val_accuracy"]
            print(f"[{done}/{len(jobs)}] {run['setting']:5s} {run['method']:11s} seed {run['seed']}: "
                  f"ensemble {ensemble:.2f}% ({run['seconds']:.0f} s, {(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    runs.sort(key=lambda run: (run["setting"], run["method"], run["seed"]))

    plots = [f"study{tag}_accuracy_vs_alpha.png", f"study{tag}_learning_curves.png"]
    report = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([".venv/bin/python", "benchmarks/mutual_learning_study.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "workers": args.workers,
        "wall_seconds": time.perf_counter() - started,
        "seeds": seeds,
        "epochs": epochs,
        "settings": [vars(setting) for setting in SETTINGS],
        "methods": [vars(method) for method in METHODS],
        "config_template": run_config(SETTINGS[0], METHODS[0], 0, epochs, "<temporary>"),
        "plots": plots,
        "aggregates": aggregate(runs),
        "runs": runs,
    }
    (args.out / f"study_digits{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_report(report, args.out, tag)
    print(f"wrote {args.out}/study_digits{tag}.{{json,md}}, {plots[0]}, {plots[1]} in {report['wall_seconds'] / 60:.1f} min")


def write_report(report: dict[str, Any], out: Path, tag: str) -> None:
    """The Markdown table and verdict and the two plots, all computed from ``report`` (the JSON's content)."""
    (out / f"study_digits{tag}.md").write_text(markdown(report))
    plot_accuracy_vs_alpha(report["aggregates"], out / report["plots"][0])
    plot_learning_curves(report["aggregates"], out / report["plots"][1])


if __name__ == "__main__":
    main()
