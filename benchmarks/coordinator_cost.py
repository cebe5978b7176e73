"""What the coordinator's batched Rényi computation costs, against a per-pair loop and the earlier code.

For every K×B×C of the grid, on random logits and on confident ones (every student puts +15 on
the same class of each sample, as late in training), one torch thread, it times:
- ``batched``: :func:`rdml_dist.divergence.mimicry_gradients` as the coordinator calls it
  (gradients and losses, ``with_targets=False``);
- ``per_pair``: the naive reference, a Python loop over the K·(K−1) ordered pairs, each
  ``softmax(α ℓ_j + (1−α) ℓ_k)`` and its ``logsumexp`` over the B×C batch;
- ``baseline``: ``mimicry_gradients`` of ``rdml_dist/divergence.py`` at an earlier commit
  (``--baseline-commit``, default the last one before the cliff-free computation), loaded from git,
  so both run on the same machine in the same process. Its exact fallback path for confident
  logits builds K×K×B×C tensors: cells where that would exceed ``--baseline-max-gib`` are skipped.
- ``rows/S``: the batched computation on B/S rows, what each of S coordinator shards computes.

The contenders of a cell are timed in interleaved rounds (each round calls every one of them), and
each timing is the median over the rounds, so their ratios are taken side by side.
Writes benchmarks/results/coordinator_cost{,_quick}.{json,md} and a PNG plot. Run:
    .venv/bin/python benchmarks/coordinator_cost.py            # full grid, 6 min on 2 cores
    .venv/bin/python benchmarks/coordinator_cost.py --quick    # K in {2, 16, 64}, 4 min
    .venv/bin/python benchmarks/coordinator_cost.py --render-only   # the Markdown and plot again from the JSON
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rdml_dist.divergence import mimicry_gradients  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REPOSITORY = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "8fef735"  # rdml_dist/divergence.py before the cliff-free computation
ALPHA = {"random": 2.0, "confident": 5.0}
CONFIDENCE_BONUS = 15.0


def cohort_logits(kind: str, k: int, b: int, c: int, seed: int = 0) -> torch.Tensor:
    """K×B×C float32 logits: standard normal, or with +15 on one class per sample that all students share."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, b, c, generator=generator)
    if kind == "confident":
        logits[:, torch.arange(b), torch.randint(c, (b,), generator=generator)] += CONFIDENCE_BONUS
    return logits


def per_pair_loop(logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and losses by a loop over ordered pairs (the reference a batched computation must beat)."""
    logp = torch.log_softmax(logits, dim=-1)
    k, batch, _ = logp.shape
    targets = torch.zeros_like(logp)
    losses = torch.zeros(k)
    for student in range(k):
        for peer in range(k):
            if peer == student:
                continue
            mix = alpha * logp[peer] + (1 - alpha) * logp[student]
            targets[student] += torch.softmax(mix, dim=-1) / (k - 1)
            losses[student] += torch.logsumexp(mix, dim=-1).sum() / ((alpha - 1) * batch * (k - 1))
    return targets, losses


def load_baseline(commit: str) -> ModuleType | None:
    """``rdml_dist/divergence.py`` as it was at ``commit``, imported under another name (None without git)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPOSITORY), "show", f"{commit}:rdml_dist/divergence.py"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="rdml-baseline-")) / "baseline_divergence.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_divergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved_seconds(calls: dict[str, Callable[[], Any]], budget_seconds: float, max_rounds: int = 30) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in rounds that run all of them back to back.

    This machine's speed drifts by up to 1.5× within minutes; timing the contenders in the same
    rounds makes their ratio follow the same drift. After one warm-up call each, a call cheaper than
    about 20 ms is repeated within a round and its mean taken, so that no round is timer noise.
    At least 3 rounds, more until ``budget_seconds`` is spent.
    """
    repeats = {}
    for name, call in calls.items():
        started = time.perf_counter()
        call()
        repeats[name] = max(1, math.ceil(0.02 / max(time.perf_counter() - started, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    started = time.perf_counter()
    for done in range(1, max_rounds + 1):
        for name, call in calls.items():
            round_started = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            times[name].append((time.perf_counter() - round_started) / repeats[name])
        if done >= 3 and time.perf_counter() - started > budget_seconds:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def measure_cell(k: int, b: int, c: int, kind: str, baseline: ModuleType | None, args: argparse.Namespace) -> dict[str, Any]:
    """All timings of one grid cell, and the batched result's largest deviation from the per-pair loop."""
    alpha = ALPHA[kind]
    logits = cohort_logits(kind, k, b, c)
    row: dict[str, Any] = {"k": k, "b": b, "c": c, "logits": kind, "alpha": alpha}
    result = mimicry_gradients(logits, alpha=alpha)
    reference_targets, reference_losses = per_pair_loop(logits.double(), alpha)
    row["max_target_error"] = float((result.targets.double() - reference_targets).abs().max())
    row["max_loss_relative_error"] = float(((result.losses.double() - reference_losses) / reference_losses.abs()).abs().max())
    calls = {
        "batched": lambda: mimicry_gradients(logits, alpha=alpha, with_targets=False),
        "per_pair": lambda: per_pair_loop(logits, alpha),
    }
    exact_path_gib = k * k * b * c * 4 / 2**30
    if baseline is not None and (kind == "random" or exact_path_gib <= args.baseline_max_gib):
        calls["baseline"] = lambda: baseline.mimicry_gradients(logits, alpha=alpha)
    for shards in args.shards:
        calls[f"shard_{shards}"] = lambda rows=logits[:, : b // shards]: mimicry_gradients(rows, alpha=alpha, with_targets=False)
    for name, seconds in interleaved_seconds(calls, args.seconds_per_cell).items():
        row[f"{name}_s"] = seconds
    row["per_pair_over_batched"] = row["per_pair_s"] / row["batched_s"]
    if "baseline_s" in row:
        row["baseline_over_batched"] = row["baseline_s"] / row["batched_s"]
    return row


def render_markdown(report: dict[str, Any]) -> str:
    """One table of every cell, then the checks the issue asks for, computed from the rows."""
    shard_columns = [f"shard_{shards}_s" for shards in report["shards"]]
    lines = [
        f"# Coordinator cost ({report['mode']} mode, benchmarks/coordinator_cost.py)",
        "",
        f"Machine: {report['machine']}; one torch thread. Command: `{report['command']}`. "
        f"Baseline: `rdml_dist/divergence.py` at commit {report['baseline_commit']}"
        f"{'' if report['baseline_loaded'] else ' (not available: no git checkout)'}. "
        f"Random logits use α = {ALPHA['random']}, confident ones (+{CONFIDENCE_BONUS:.0f} on a shared class) α = {ALPHA['confident']}. "
        "Median over interleaved rounds of ms per call computing the whole cohort's gradients and losses.",
        "",
        "| K | B | C | logits | batched | per-pair loop | loop / batched | baseline | baseline / batched | "
        + " | ".join(f"B/{column.split('_')[1]} rows" for column in shard_columns) + " | max target error |",
        "|---" * (10 + len(shard_columns)) + "|",
    ]
    for row in report["rows"]:
        baseline = f"{1000 * row['baseline_s']:.2f} | {row['baseline_over_batched']:.1f}×" if "baseline_s" in row else "– | –"
        shards = " | ".join(f"{1000 * row[column]:.2f}" for column in shard_columns)
        lines.append(
            f"| {row['k']} | {row['b']} | {row['c']} | {row['logits']} | {1000 * row['batched_s']:.2f} | "
            f"{1000 * row['per_pair_s']:.2f} | {row['per_pair_over_batched']:.1f}× | {baseline} | {shards} | "
            f"{row['max_target_error']:.1e} |"
        )
    lines += ["", "## Checks", ""]
    for row in report["rows"]:
        if row["k"] == 16 and row["b"] == 128:
            verdict = "yes" if row["per_pair_over_batched"] >= 10 else "NO"
            lines.append(f"- K=16, B=128, C={row['c']}, {row['logits']}: {row['per_pair_over_batched']:.1f}× faster "
                         f"than the per-pair loop (at least 10×: {verdict})")
    for row in report["rows"]:
        if (row["k"], row["b"], row["c"]) == (64, 256, 1000) and "baseline_s" in row:
            verdict = "yes" if row["baseline_over_batched"] >= 3 else "NO"
            lines.append(f"- K=64, B=256, C=1000, {row['logits']}: {1000 * row['batched_s']:.0f} ms vs "
                         f"{1000 * row['baseline_s']:.0f} ms for the baseline, {row['baseline_over_batched']:.1f}× "
                         f"(at least 3×: {verdict})")
    confident = {(row["k"], row["b"], row["c"]): row["batched_s"] for row in report["rows"] if row["logits"] == "confident"}
    ratios = [confident[key] / row["batched_s"] for row in report["rows"]
              if row["logits"] == "random" and (key := (row["k"], row["b"], row["c"])) in confident]
    lines.append(f"- Confident / random logits, batched: {min(ratios):.2f}× to {max(ratios):.2f}× over the grid "
                 "(no exact-path cliff)")
    lines += ["", f"Plot: `{report['plot']}`."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """ms per call against K, one panel per C (B = 128), batched vs loop vs baseline, random and confident logits."""
    batch = 128  # measured for every K in both modes
    classes = sorted({row["c"] for row in report["rows"]})
    figure, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4.2))
    for axis, c in zip(axes, classes):
        for kind, style in (("random", "-"), ("confident", "--")):
            rows = sorted((row for row in report["rows"] if row["c"] == c and row["b"] == batch and row["logits"] == kind),
                          key=lambda row: row["k"])
            ks = [row["k"] for row in rows]
            axis.plot(ks, [1000 * row["batched_s"] for row in rows], "o" + style, color="C0", label=f"batched, {kind}")
            axis.plot(ks, [1000 * row["per_pair_s"] for row in rows], "s" + style, color="C1", label=f"per-pair loop, {kind}")
            with_baseline = [row for row in rows if "baseline_s" in row]
            axis.plot([row["k"] for row in with_baseline], [1000 * row["baseline_s"] for row in with_baseline],
                      "^" + style, color="C2", label=f"baseline, {kind}")
        axis.set(xscale="log", yscale="log", xlabel="K (students)", ylabel="ms per step", title=f"B={batch}, C={c}")
        axis.minorticks_off()
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Coordinator: Rényi targets of the whole cohort per step (one CPU thread)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 16, 64} and the cells the checks need")
    parser.add_argument("--seconds-per-cell", type=float, default=2.0, help="keep timing rounds of a cell until this much time is spent (at least 3 rounds)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--baseline-max-gib", type=float, default=8.0, help="skip baseline cells whose exact path would need more")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4], help="coordinator shard counts S to time B/S rows for")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown and the plot from the JSON of an earlier run")
    args = parser.parse_args()
    tag = "_quick" if args.quick else ""
    if args.render_only:
        report = json.loads((args.out / f"coordinator_cost{tag}.json").read_text())
        write_report(report, args.out, tag)
        return 0
    torch.set_num_threads(1)
    if args.quick:
        grid = [(k, 128, c) for k in (2, 16, 64) for c in (10, 100, 1000)] + [(64, 256, 1000)]
    else:
        grid = [(k, b, c) for k in (2, 4, 8, 16, 32, 64) for b in (128, 256) for c in (10, 100, 1000)]
    baseline = load_baseline(args.baseline_commit)
    started = time.perf_counter()
    rows = []
    for k, b, c in grid:
        for kind in ("random", "confident"):
            rows.append(measure_cell(k, b, c, kind, baseline, args))
            row = rows[-1]
            print(f"K={k:2d} B={b} C={c:4d} {kind:9s}: batched {1000 * row['batched_s']:8.2f} ms, "
                  f"loop {1000 * row['per_pair_s']:8.2f} ms, baseline "
                  f"{1000 * row['baseline_s'] if 'baseline_s' in row else float('nan'):9.2f} ms", flush=True)
    report = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([".venv/bin/python", "benchmarks/coordinator_cost.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "baseline_commit": args.baseline_commit,
        "baseline_loaded": baseline is not None,
        "shards": args.shards,
        "wall_seconds": time.perf_counter() - started,
        "plot": f"coordinator_cost{tag}.png",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"coordinator_cost{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(write_report(report, args.out, tag))
    return 0


def write_report(report: dict[str, Any], out: Path, tag: str) -> str:
    """The Markdown table and checks and the plot, from ``report`` (the JSON's content); returns the Markdown."""
    markdown = render_markdown(report)
    (out / f"coordinator_cost{tag}.md").write_text(markdown)
    plot(report, out / report["plot"])
    return markdown


if __name__ == "__main__":
    sys.exit(main())
