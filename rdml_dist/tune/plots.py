"""PNG plots of a sweep: the metric against each searched parameter, and the learning curves of the top trials."""

import json
import math
from pathlib import Path

from rdml_dist.tune.results import TrialOutcome
from rdml_dist.tune.sweep import SweepConfig

TOP_TRIALS = 5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot



def _label(value: object) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def plot_parameters(rows: list[TrialOutcome], sweep: SweepConfig, directory: Path) -> list[Path]:
    """One PNG per searched parameter: every trial's final metric against its value (categories for non-numbers)."""
    pyplot = _pyplot()
    written = []
    reported = [row for row in rows if not math.isnan(row.final)]
    for path in sweep.space:
        values = [row.params[path] for row in reported]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        figure, axes = pyplot.subplots(figsize=(5, 3.6))
        if numeric:
            positions = values
        else:
            categories = sorted({_label(v) for v in values})
            positions = [categories.index(_label(v)) for v in values]
            axes.set_xticks(range(len(categories)), categories, rotation=20, fontsize=7)
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            chosen = [(x, row.final) for x, row in zip(positions, reported) if row.status == status]
            if chosen:
                axes.scatter(*zip(*chosen), marker=marker, label=status)
        axes.set_xlabel(path)
        axes.set_ylabel(f"final {sweep.metric}")
        axes.set_title(f"{sweep.name}: {sweep.metric} by {path}", fontsize=9)
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        target = directory / f"metric_by_{path.replace('/', '_')}.png"
        figure.savefig(target, dpi=110)
        pyplot.close(figure)
        written.append(target)
    return written


def plot_learning_curves(rows: list[TrialOutcome], sweep: SweepConfig, directory: Path) -> Path:
    """The metric per epoch of the top trials (ranked by the final metric)."""
    pyplot = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for row in [row for row in rows if row.curve][:TOP_TRIALS]:
        label = ", ".join(f"{path.rsplit('.', 1)[-1]}={_label(value)}" for path, value in row.params.items())
        axes.plot(range(1, len(row.curve) + 1), row.curve, marker="o", markersize=3, label=f"{row.trial_id}: {label}"[:60])
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(sweep.metric)
    axes.set_title(f"{sweep.name}: top {TOP_TRIALS} trials", fontsize=9)
    axes.legend(fontsize=6)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    target = directory / "learning_curves.png"
    figure.savefig(target, dpi=110)
    pyplot.close(figure)
    return target
