"""PNG plots of one run, drawn from its ``results.json``: accuracy, losses and schedules, and where each step's time goes.

``rdml-dist report RUN_DIR`` draws them on demand and every run draws them into
``{run_dir}/plots/`` after its last epoch. matplotlib is imported only here, when a plot is drawn,
through its object-oriented ``Figure`` (no pyplot state, no display needed).
"""

import io
import json
import math
from typing import Any

from rdml_dist.errors import ConfigError
from rdml_dist.run_records.run_directory import PLOTS_DIR, RESULTS_JSON
from rdml_dist.run_records.storage import Storage

TIMING_PARTS = (  # (results key, label): the parts of a student's step, in the order they happen
    ("compute_seconds", "compute (forward + backward)"),
    ("wait_seconds", "wait for the slowest peer"),
    ("coordinator_seconds", "coordinator computation"),
    ("exchange_overhead_seconds", "exchange (transport)"),
)
ENSEMBLE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 2.2}


def read_results(storage: Storage) -> dict[str, Any]:
    """A run's ``results.json``, or a clear error when the location holds no results."""
    if not storage.exists(RESULTS_JSON):
        raise ConfigError("RUN_DIR", f"{storage.describe()} holds no {RESULTS_JSON} (not a run directory, or no epoch finished yet)")
    return json.loads(storage.read_bytes(RESULTS_JSON))


def _value(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _series(epochs: list[dict[str, Any]], student: str, key: str) -> list[float]:
    return [_value(entry["students"].get(student, {}).get(key)) for entry in epochs]


def _epoch_axis(axes: Any) -> None:
    """Whole epochs on the x axis, and a light grid."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def accuracy_plot(results: dict[str, Any]) -> bytes:
    """Validation accuracy per epoch of every student and of the ensemble."""
    from matplotlib.figure import Figure

    epochs = results["epochs"]
    x = [entry["epoch"] for entry in epochs]
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for student in results["students"]:
        axes.plot(x, [100 * value for value in _series(epochs, student, "val_accuracy")], marker="o", markersize=3, label=student)
    axes.plot(x, [100 * _value(entry["ensemble_val_accuracy"]) for entry in epochs], label="ensemble", **ENSEMBLE_STYLE)
    axes.set(title=f"{results['name']}: validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    _epoch_axis(axes)
    axes.legend()
    return _png(figure)


def losses_plot(results: dict[str, Any]) -> bytes:
    """Per-student training cross-entropy and mimicry loss per epoch, and the α and λ schedules."""
    from matplotlib.figure import Figure

    epochs = results["epochs"]
    x = [entry["epoch"] for entry in epochs]
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    ce, mimicry, schedule = figure.subplots(1, 3)
    for student in results["students"]:
        ce.plot(x, _series(epochs, student, "train_ce"), marker="o", markersize=3, label=student)
        mimicry.plot(x, _series(epochs, student, "train_mimicry"), marker="o", markersize=3, label=student)
    ce.set(title="cross-entropy (train, epoch mean)", xlabel="epoch")
    mimicry.set(title="mimicry loss (train, epoch mean)", xlabel="epoch")
    schedule.plot(x, [_value(entry.get("alpha")) for entry in epochs], marker="o", markersize=3, label="α (Rényi order)")
    schedule.plot(x, [_value(entry.get("mimicry_weight")) for entry in epochs], marker="s", markersize=3, label="λ (mimicry weight)")
    schedule.set(title="α and λ at the epoch's last step", xlabel="epoch")
    for axes in (ce, mimicry, schedule):
        _epoch_axis(axes)
        axes.legend(fontsize="small")
    return _png(figure)


def timing_plot(results: dict[str, Any]) -> bytes:
    """Each student's mean step, split into compute, straggler wait, coordinator computation and transport."""
    from matplotlib.figure import Figure

    students = list(results["students"])
    figure = Figure(figsize=(8, 1.8 + 0.6 * len(students)), layout="constrained")
    axes = figure.add_subplot()
    left = [0.0] * len(students)
    for key, label in TIMING_PARTS:
        means = [1000 * _mean_over_epochs(results["epochs"], student, key) for student in students]
        widths = [0.0 if math.isnan(value) else value for value in means]
        axes.barh(students, widths, left=left, label=label)
        left = [start + width for start, width in zip(left, widths)]
    axes.invert_yaxis()
    axes.set(title="mean time per step (blank parts: not measured by this engine)", xlabel="milliseconds")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    return _png(figure)


def _mean_over_epochs(epochs: list[dict[str, Any]], student: str, key: str) -> float:
    known = [value for value in _series(epochs, student, key) if not math.isnan(value)]
    return sum(known) / len(known) if known else math.nan


def write_plots(results: dict[str, Any], out: Storage) -> list[str]:
    """Draw every plot of a run into ``out``; returns where each PNG went."""
    if not results.get("epochs"):
        raise ConfigError("RUN_DIR", "the run has no scored epoch yet: nothing to plot")
    drawn = {"accuracy.png": accuracy_plot(results), "losses.png": losses_plot(results), "timing.png": timing_plot(results)}
    for name, png in drawn.items():
        out.write_bytes(name, png)
    return [out.describe(name) for name in drawn]


class FinalPlots:
    """A :class:`~rdml_dist.engines.loop.RunObserver` that draws the run's plots into ``{run_dir}/plots/`` after its last epoch."""

    def __init__(self, storage: Storage, epochs: int) -> None:
        self.storage = storage
        self.last_epoch = epochs - 1
        self.written: list[str] = []

    def on_epoch(self, entry: dict[str, Any]) -> None:
        if entry["epoch"] == self.last_epoch:
            self.written = write_plots(read_results(self.storage), Storage(self.storage.describe(PLOTS_DIR)))

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        """Nothing to do: the plots are drawn once, from the finished results."""
