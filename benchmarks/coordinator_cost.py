"""What the coordinator's batched Rényi computation costs, against the strongest simple loop and the machine's limit.

For every K×B×C of the grid, on random logits and on confident ones (every student puts +15 on
the same class of each sample, as late in training), one torch thread, it times:
- ``batched``: what the coordinator runs per step: the K frames stacked by sample into its
  workspace (:func:`rdml_dist.divergence.stack_by_sample`), then
  :func:`rdml_dist.divergence.mimicry_gradients` (gradients and losses, ``with_targets=False``) into it,
  by the compiled step (:mod:`rdml_dist.kernels.native`) where the extension is built;
- ``torch``: the same in torch alone (the compiled step switched off), as where no C compiler was
  found at install;
- ``floor``: the limit of the factored computation on this machine: one K×B×C copy, the exp of the
  two K×B×C factors and the two ``bmm``, with the same torch primitives, in the same row blocks and
  into buffers made once (:class:`FactoredFloor`);
- ``loop``: the strongest simple alternative, a Python loop over the K·(K−1) ordered pairs, each one
  ``exp`` of the mixture α ℓ_j + (1−α) ℓ_k whose normaliser serves both the target and the loss;
- ``baseline``: ``mimicry_gradients`` of ``rdml_dist/divergence.py`` at an earlier commit
  (``--baseline-commit``, default the last one before the cliff-free computation), loaded from git,
  so both run on the same machine in the same process. Its exact fallback path for confident
  logits builds K×K×B×C tensors: cells where that would exceed ``--baseline-max-gib`` are skipped.
- ``rows/S``: the batched computation on B/S rows, what each of S coordinator shards computes.

The contenders of a cell are timed in interleaved rounds (each round calls every one of them once
or, below 20 ms, a few times), so each round sees the same state of the machine, caches and pages
included: the loop between calls leaves the caches cold, as the coordinator's own work between
steps does. Times are CPU seconds of the benchmark's one thread (``time.thread_time``), so that
what the shared machine gives to other processes does not count; wall seconds are in the JSON.
Each time is the median over the rounds, each ratio the median of the per-round ratios.
Writes benchmarks/results/coordinator_cost{,_quick}{,_forms}.{json,md} and a PNG plot. Run:
    .venv/bin/python benchmarks/coordinator_cost.py            # full grid
    .venv/bin/python benchmarks/coordinator_cost.py --quick    # K in {2, 16, 64}
    .venv/bin/python benchmarks/coordinator_cost.py --forms    # also both compiled forms (…_forms.{json,md})
    .venv/bin/python benchmarks/coordinator_cost.py --render-only   # the Markdown and plot again from the JSON
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import rdml_dist.kernels.mimicry as kernels  # noqa: E402
from rdml_dist.kernels import native  # noqa: E402
from rdml_dist.divergence import MimicryWorkspace, mimicry_gradients, stack_by_sample  # noqa: E402

from earlier_code import module_at  # noqa: E402 - beside this script

RESULTS = Path(__file__).parent / "results"
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


def per_pair_loop(logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets, gradients and losses by a loop over ordered pairs: the strongest simple alternative.

    Per pair one ``exp`` of the mixture α ℓ_j + (1−α) ℓ_k, shifted by its maximum; its sum is the
    normaliser that both the target (the weights divided by it) and the loss (the log-sum-exp) use.
    The student's own part is scaled once, outside the loop over its peers.
    """
    logp = torch.log_softmax(logits, dim=-1)
    k, batch, _ = logp.shape
    targets = torch.zeros_like(logp)
    grads = torch.empty_like(logp)
    losses = torch.zeros(k, dtype=logp.dtype)
    for student in range(k):
        own = logp[student] * (1 - alpha)
        for peer in range(k):
            if peer == student:
                continue
            mix = torch.add(own, logp[peer], alpha=alpha)
            top = mix.amax(-1, keepdim=True)
            weights = mix.sub_(top).exp_()
            total = weights.sum(-1, keepdim=True)
            targets[student].addcdiv_(weights, total)
            losses[student] += (top + total.log()).sum()
        targets[student] /= k - 1
        torch.sub(logp[student].exp(), targets[student], out=grads[student]).div_(batch)
    return targets, grads, losses / ((alpha - 1) * batch * (k - 1))


class CoordinatorCall:
    """One step of the coordinator's computation, as :class:`rdml_dist.coordinator_core.coordinator.CohortCoordinator` runs it.

    The K frames (B×C each) are stacked by sample into the workspace kept between steps, and the
    gradients and losses are written into it.
    """

    def __init__(self, logits: torch.Tensor, alpha: float, form: str = "chosen") -> None:
        self.frames = list(logits.unbind(0))
        self.alpha = alpha
        self.workspace = MimicryWorkspace()
        self.form = form

    def __call__(self) -> Any:
        with step_form(self.form):
            stacked = stack_by_sample(self.frames, torch.device("cpu"), self.workspace)
            return mimicry_gradients(stacked, alpha=self.alpha, with_targets=False, workspace=self.workspace)


@contextlib.contextmanager
def step_form(form: str) -> Iterator[None]:
    """The step as chosen (``chosen``), in torch alone (``torch``), or in one compiled form for every
    shape: the whole step in lanes (``lanes``) or the passes around torch's bmm (``passes``)."""
    if form == "torch":
        with native.switched_off():
            yield
        return
    limits = native.WHOLE_STEP_MAX_SAMPLE_SIZE, native.WHOLE_STEP_MAX_STUDENTS
    forced = {"chosen": limits, "lanes": (math.inf, math.inf), "passes": (0, 0)}[form]
    native.WHOLE_STEP_MAX_SAMPLE_SIZE, native.WHOLE_STEP_MAX_STUDENTS = forced
    try:
        yield
    finally:
        native.WHOLE_STEP_MAX_SAMPLE_SIZE, native.WHOLE_STEP_MAX_STUDENTS = limits


class FactoredFloor:
    """The machine's limit for the factored computation of one cell, timed with the same torch primitives.

    Per call: one K×B×C copy (the logits into the by-sample layout), the exp of the two K×B×C
    factors and the two ``bmm`` (the B×K×K overlaps, then the B×K×C gradients), in the row blocks
    the batched code uses (so the exps run in cache, as its own do) and into buffers made once, so
    no call pays for fresh pages. What the batched code costs beyond this is its overhead.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        k, batch, classes = logits.shape
        self.logits = logits
        self.rows = max(1, kernels._CHUNK_BYTES // (k * classes * logits.element_size()))
        block = min(self.rows, batch)
        self.by_sample = torch.empty(batch, k, classes)
        self.factors = torch.empty(2, block, k, classes)
        self.overlap = torch.empty(block, k, k)
        self.grads = torch.empty(batch, k, classes)

    def __call__(self) -> torch.Tensor:
        batch = self.logits.shape[1]
        self.by_sample.copy_(self.logits.transpose(0, 1))
        for start in range(0, batch, self.rows):
            rows = slice(start, start + self.rows)
            block = self.by_sample[rows]
            peer, own = self.factors[:, : block.shape[0]]
            overlap = self.overlap[: block.shape[0]]
            torch.exp(block, out=peer)
            torch.exp(block, out=own)
            torch.bmm(peer, own.transpose(1, 2), out=overlap)
            torch.bmm(overlap, peer, out=self.grads[rows])
        return self.grads


def load_baseline(commit: str) -> ModuleType | None:
    """``rdml_dist/divergence.py`` as it was at ``commit``, imported under another name (None without git)."""
    try:
        return module_at(commit, "rdml_dist/divergence.py", "baseline_divergence")
    except (OSError, subprocess.CalledProcessError):
        return None


def interleaved_rounds(calls: dict[str, Callable[[], Any]], budget_seconds: float, max_rounds: int = 30) -> dict[str, dict[str, list[float]]]:
    """CPU and wall seconds per call of each of ``calls``, one value per round; each round runs all of them.

    This machine is shared and its speed drifts within minutes; timing the contenders in the same
    rounds makes their per-round ratio follow the same drift. After one warm-up call each, a call
    cheaper than about 20 ms is repeated within a round and its mean taken, so that no round is
    timer noise. At least 3 rounds, more until ``budget_seconds`` (wall) is spent.
    """
    repeats = {}
    for name, call in calls.items():
        started = time.thread_time()
        call()
        repeats[name] = max(1, math.ceil(0.02 / max(time.thread_time() - started, 1e-6)))
    times: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in calls}
    started = time.perf_counter()
    for done in range(1, max_rounds + 1):
        for name, call in calls.items():
            cpu_started, wall_started = time.thread_time(), time.perf_counter()
            for _ in range(repeats[name]):
                call()
            times[name]["cpu"].append((time.thread_time() - cpu_started) / repeats[name])
            times[name]["wall"].append((time.perf_counter() - wall_started) / repeats[name])
        if done >= 3 and time.perf_counter() - started > budget_seconds:
            break
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator, each pair timed in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def measure_cell(k: int, b: int, c: int, kind: str, baseline: ModuleType | None, args: argparse.Namespace) -> dict[str, Any]:
    """All timings of one grid cell, and the batched result's largest deviation from the per-pair loop."""
    alpha = ALPHA[kind]
    logits = cohort_logits(kind, k, b, c)
    row: dict[str, Any] = {"k": k, "b": b, "c": c, "logits": kind, "alpha": alpha}
    if k * k * b * c <= args.reference_max_pair_elements:
        result = mimicry_gradients(logits, alpha=alpha)
        reference_targets, reference_grads, reference_losses = per_pair_loop(logits.double(), alpha)
        row["max_target_error"] = float((result.targets.double() - reference_targets).abs().max())
        row["max_grad_relative_error"] = float((result.grads.double() - reference_grads).norm() / reference_grads.norm())
        row["max_loss_relative_error"] = float(((result.losses.double() - reference_losses) / reference_losses.abs()).abs().max())
    calls = {
        "batched": CoordinatorCall(logits, alpha),
        "torch": CoordinatorCall(logits, alpha, form="torch"),
        "floor": FactoredFloor(logits),
        "loop": lambda: per_pair_loop(logits, alpha),
    }
    exact_path_gib = k * k * b * c * 4 / 2**30
    if baseline is not None and (kind == "random" or exact_path_gib <= args.baseline_max_gib):
        calls["baseline"] = lambda: baseline.mimicry_gradients(logits, alpha=alpha)
    if args.forms:
        calls.update({form: CoordinatorCall(logits, alpha, form=form) for form in ("lanes", "passes")})
    for shards in args.shards:
        calls[f"shard_{shards}"] = CoordinatorCall(logits[:, : b // shards], alpha)
    times = interleaved_rounds(calls, args.seconds_per_cell)
    for name, measured in times.items():
        row[f"{name}_s"] = statistics.median(measured["cpu"])
        row[f"{name}_wall_s"] = statistics.median(measured["wall"])
    row["rounds"] = len(times["batched"]["cpu"])
    row["batched_over_floor"] = median_ratio(times["batched"]["cpu"], times["floor"]["cpu"])
    row["torch_over_floor"] = median_ratio(times["torch"]["cpu"], times["floor"]["cpu"])
    for form in ("lanes", "passes"):
        if form in times:
            row[f"{form}_over_floor"] = median_ratio(times[form]["cpu"], times["floor"]["cpu"])
    row["whole_step_chosen"] = native.whole_step_serves(k, c)
    row["loop_over_batched"] = median_ratio(times["loop"]["cpu"], times["batched"]["cpu"])
    if "baseline" in times:
        row["baseline_over_batched"] = median_ratio(times["baseline"]["cpu"], times["batched"]["cpu"])
    return row


def render_markdown(report: dict[str, Any]) -> str:
    """One table of every cell, then the cells beyond 1.5× of their floor, computed from the rows."""
    shard_columns = [f"shard_{shards}_s" for shards in report["shards"]]
    lines = [
        f"# Coordinator cost ({report['mode']} mode, benchmarks/coordinator_cost.py)",
        "",
        f"Machine: {report['machine']}; one torch thread. Command: `{report['command']}` ({report['wall_seconds'] / 60:.0f} min). "
        f"Random logits use α = {ALPHA['random']}, confident ones (+{CONFIDENCE_BONUS:.0f} on a shared class) α = {ALPHA['confident']}. "
        "ms of CPU time per call computing the whole cohort's gradients and losses, median over interleaved rounds; "
        "each ratio is the median of the per-round ratios. `batched`: the coordinator's step (stack into its workspace, "
        f"then the factored computation, by the compiled step: {'built' if report['compiled'] else 'NOT BUILT, torch alone'}); "
        "`torch`: the same in torch alone (no C compiler at install); `floor`: one K×B×C copy, the exp of two K×B×C factors and two `bmm`; "
        "`loop`: per ordered pair one exp whose normaliser serves target and loss; "
        f"`baseline`: `rdml_dist/divergence.py` at commit {report['baseline_commit']}"
        f"{'' if report['baseline_loaded'] else ' (not available: no git checkout)'}.",
        "",
        "| K | B | C | logits | batched | floor | batched / floor | loop | loop / batched | torch | torch / floor | "
        "baseline | baseline / batched | "
        + " | ".join(f"B/{column.split('_')[1]} rows" for column in shard_columns) + " | max target error |",
        "|---" * (14 + len(shard_columns)) + "|",
    ]
    for row in report["rows"]:
        baseline = f"{1000 * row['baseline_s']:.2f} | {row['baseline_over_batched']:.1f}×" if "baseline_s" in row else "– | –"
        shards = " | ".join(f"{1000 * row[column]:.2f}" for column in shard_columns)
        lines.append(
            f"| {row['k']} | {row['b']} | {row['c']} | {row['logits']} | {1000 * row['batched_s']:.2f} | "
            f"{1000 * row['floor_s']:.2f} | {row['batched_over_floor']:.2f}× | {1000 * row['loop_s']:.2f} | "
            f"{row['loop_over_batched']:.1f}× | {1000 * row['torch_s']:.2f} | {row['torch_over_floor']:.2f}× | {baseline} | {shards} | "
            f"{format(row['max_target_error'], '.1e') if 'max_target_error' in row else '–'} |"
        )
    over = [row for row in report["rows"] if row["batched_over_floor"] > 1.5]
    ratios = [row["batched_over_floor"] for row in report["rows"]]
    lines += [
        "", "## Checks", "",
        f"- Batched / floor over the grid: {min(ratios):.2f}× to {max(ratios):.2f}× (median {statistics.median(ratios):.2f}×); "
        f"within 1.5×: {len(ratios) - len(over)} of {len(ratios)} cells",
    ]
    lines += [f"  - beyond 1.5×: K={row['k']}, B={row['b']}, C={row['c']}, {row['logits']}: {row['batched_over_floor']:.2f}× "
              f"({1000 * row['batched_s']:.2f} vs {1000 * row['floor_s']:.2f} ms)" for row in over]
    loop = [row["loop_over_batched"] for row in report["rows"]]
    lines.append(f"- Loop / batched over the grid: {min(loop):.1f}× to {max(loop):.1f}×")
    alone = [row["torch_over_floor"] for row in report["rows"]]
    lines.append(f"- Torch alone / floor over the grid: {min(alone):.2f}× to {max(alone):.2f}× "
                 f"(median {statistics.median(alone):.2f}×); within 1.5×: {sum(ratio <= 1.5 for ratio in alone)} of {len(alone)} cells")
    confident = {(row["k"], row["b"], row["c"]): row["batched_s"] for row in report["rows"] if row["logits"] == "confident"}
    cliff = [confident[key] / row["batched_s"] for row in report["rows"]
             if row["logits"] == "random" and (key := (row["k"], row["b"], row["c"])) in confident]
    lines.append(f"- Confident / random logits, batched: {min(cliff):.2f}× to {max(cliff):.2f}× over the grid (no exact-path cliff)")
    checked = [row for row in report["rows"] if "max_target_error" in row]
    lines.append(f"- Largest deviation from the float64 loop ({len(checked)} cells with K·K·B·C ≤ 2^28): "
                 f"targets {max(row['max_target_error'] for row in checked):.1e}, "
                 f"gradients {max(row['max_grad_relative_error'] for row in checked):.1e} (relative norm), "
                 f"losses {max(row['max_loss_relative_error'] for row in checked):.1e} (relative)")
    forms = [row for row in report["rows"] if "lanes_over_floor" in row]
    if forms:
        lines += ["", "## The compiled step's two forms (--forms)", "",
                  "Each cell timed in both forms in the same rounds; the chosen form is the one `native.whole_step_serves` picks.", "",
                  "| K | B | C | logits | lanes / floor | passes / floor | chosen |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['k']} | {row['b']} | {row['c']} | {row['logits']} | {row['lanes_over_floor']:.2f}× | "
                  f"{row['passes_over_floor']:.2f}× | {'lanes' if row['whole_step_chosen'] else 'passes'} |" for row in forms]
    lines += ["", f"Plot: `{report['plot']}`."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """ms per call against K, one panel per C (B = 128): batched, torch alone, floor, loop and baseline, random and confident logits."""
    batch = 128  # measured for every K in both modes
    classes = sorted({row["c"] for row in report["rows"]})
    figure, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4.2))
    for axis, c in zip(axes, classes):
        for kind, style in (("random", "-"), ("confident", "--")):
            rows = sorted((row for row in report["rows"] if row["c"] == c and row["b"] == batch and row["logits"] == kind),
                          key=lambda row: row["k"])
            ks = [row["k"] for row in rows]
            for column, marker, colour, label in (("batched_s", "o", "C0", "batched"), ("torch_s", "D", "C4", "torch alone"),
                                                  ("floor_s", "v", "C3", "floor"), ("loop_s", "s", "C1", "loop"),
                                                  ("baseline_s", "^", "C2", "baseline")):
                measured = [row for row in rows if column in row]
                axis.plot([row["k"] for row in measured], [1000 * row[column] for row in measured], marker + style,
                          color=colour, label=f"{label}, {kind}")
        axis.set(xscale="log", yscale="log", xlabel="K (students)", ylabel="CPU ms per step", title=f"B={batch}, C={c}")
        axis.minorticks_off()
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Coordinator: Rényi gradients of the whole cohort per step (one CPU thread)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 16, 64} and the cells the checks need")
    parser.add_argument("--seconds-per-cell", type=float, default=2.0, help="keep timing rounds of a cell until this much time is spent (at least 3 rounds)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--baseline-max-gib", type=float, default=1.0, help="skip baseline cells whose exact path would need more")
    parser.add_argument("--reference-max-pair-elements", type=float, default=2**28,
                        help="check against the float64 loop only where K·K·B·C is at most this (it costs two timed loops)")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4], help="coordinator shard counts S to time B/S rows for")
    parser.add_argument("--forms", action="store_true", help="also time each compiled form (lanes, passes around bmm) on every cell")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown and the plot from the JSON of an earlier run")
    args = parser.parse_args()
    tag = ("_quick" if args.quick else "") + ("_forms" if args.forms else "")
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
                  f"floor {1000 * row['floor_s']:8.2f} ms ({row['batched_over_floor']:.2f}×), "
                  f"loop {1000 * row['loop_s']:8.2f} ms ({row['loop_over_batched']:.1f}×)", flush=True)
    report = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([".venv/bin/python", "benchmarks/coordinator_cost.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "baseline_commit": args.baseline_commit,
        "compiled": native.available(),
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
