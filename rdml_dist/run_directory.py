"""The run directory: resolved config, per-step log, per-epoch results (JSON + table), checkpoints.

Every file that is rewritten during a run is written atomically (temporary file + rename), so
a crash never leaves a truncated results file or checkpoint behind.
"""

import csv
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator import EpochEvaluation, StepRecord

STEP_LOG = "steps.csv"
RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.txt"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
PLACEMENTS_JSON = "placements.json"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _mean(values: Iterable[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize_training(records: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Per-student means over an epoch's steps: losses, train accuracy and the timing breakdown.

    ``exchange_overhead_seconds`` is the round trip minus the wait for the slowest peer and the
    coordinator's computation: what the transport itself costs per step.
    """
    by_student: dict[str, list[StepRecord]] = defaultdict(list)
    for record in records:
        by_student[record.student].append(record)
    summary = {}
    for student, rows in by_student.items():
        labelled = sum(row.labelled for row in rows)
        round_trip = _mean(row.round_trip_seconds for row in rows)
        wait = _mean(row.wait_seconds for row in rows)
        coordinator = _mean(row.coordinator_seconds for row in rows)
        summary[student] = {
            "train_ce": _mean(row.ce_loss for row in rows),
            "train_mimicry": _mean(row.mimicry_loss for row in rows),
            "train_divergence": _mean(row.divergence for row in rows),
            "train_accuracy": sum(row.correct for row in rows) / labelled if labelled else math.nan,
            "compute_seconds": _mean(row.compute_seconds for row in rows),
            "round_trip_seconds": round_trip,
            "wait_seconds": wait,
            "coordinator_seconds": coordinator,
            "exchange_overhead_seconds": max(round_trip - wait - coordinator, 0.0) if not math.isnan(round_trip) else math.nan,
            "steps": len(rows),
        }
    return summary


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


class RunDirectory:
    """Owns one run's files; engines feed it step records, evaluations and student states."""

    def __init__(self, path: Path, config: ExperimentConfig, engine: str) -> None:
        self.path = path
        self.config = config
        self.engine = engine
        self.epochs: list[dict[str, Any]] = []
        path.mkdir(parents=True, exist_ok=True)
        config_text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode()
        atomic_write(path / CONFIG_FILE, lambda handle: handle.write(config_text))
        self._step_log = (path / STEP_LOG).open("w", newline="")
        self._step_writer = csv.writer(self._step_log)
        self._step_writer.writerow([column.name for column in fields(StepRecord)])

    def record_epoch(self, epoch: int, records: list[StepRecord], evaluation: EpochEvaluation, seconds: float) -> dict[str, Any]:
        """Append the epoch's steps to the log and rewrite ``results.json``; returns the epoch entry."""
        for record in records:
            self._step_writer.writerow(list(asdict(record).values()))
        self._step_log.flush()
        training = summarize_training(records)
        entry = {
            "epoch": epoch,
            "seconds": seconds,
            "alpha": records[-1].alpha if records else math.nan,
            "mimicry_weight": records[-1].weight if records else math.nan,
            "ensemble_val_accuracy": evaluation.ensemble_accuracy,
            "students": {
                name: {**training.get(name, {}), "val_accuracy": evaluation.accuracy.get(name, math.nan)}
                for name in self.config.student_names()
            },
        }
        self.epochs.append(entry)
        self.write_results()
        return entry

    def summary(self) -> dict[str, Any]:
        """Final, best and last-k-mean validation accuracy per student and for the ensemble (the papers' score)."""
        last_k = self.config.training.last_epochs_reported
        series = {name: [entry["students"][name]["val_accuracy"] for entry in self.epochs] for name in self.config.student_names()}
        series["ensemble"] = [entry["ensemble_val_accuracy"] for entry in self.epochs]
        timing_keys = ("compute_seconds", "round_trip_seconds", "wait_seconds", "exchange_overhead_seconds")
        result = {}
        for name, accuracies in series.items():
            result[name] = {
                "final_val_accuracy": accuracies[-1] if accuracies else math.nan,
                "best_val_accuracy": max(accuracies, default=math.nan),
                f"mean_last_{last_k}_val_accuracy": _mean(accuracies[-last_k:]),
            }
            if name != "ensemble":
                for key in timing_keys:
                    result[name][f"mean_{key}"] = _mean(entry["students"][name].get(key, math.nan) for entry in self.epochs)
        return result

    def write_results(self) -> None:
        document = {
            "name": self.config.name,
            "engine": self.engine,
            "students": self.config.student_names(),
            "epochs": self.epochs,
            "summary": self.summary(),
        }
        text = json.dumps(_json_safe(document), indent=2).encode()
        atomic_write(self.path / RESULTS_JSON, lambda handle: handle.write(text))

    def write_placements(self, placements: dict[str, dict[str, Any]]) -> None:
        """Record where each student ran (node, GPU ids, device) in ``placements.json``."""
        text = json.dumps(placements, indent=2).encode()
        atomic_write(self.path / PLACEMENTS_JSON, lambda handle: handle.write(text))

    def save_checkpoint(self, student: str, state: dict[str, Any]) -> Path:
        """Atomically replace ``checkpoints/<student>.pt`` with the given state."""
        target = self.path / CHECKPOINTS / f"{student}.pt"
        atomic_write(target, lambda handle: torch.save(state, handle))
        return target

    def finish(self) -> str:
        """Write the readable table, close the step log, and return the table."""
        table = format_table(self.summary(), self.config.training.last_epochs_reported)
        atomic_write(self.path / RESULTS_TABLE, lambda handle: handle.write((table + "\n").encode()))
        self._step_log.close()
        return table


def format_table(summary: dict[str, dict[str, float]], last_k: int) -> str:
    """A plain-text table of accuracies (percent) and per-step timings (milliseconds)."""
    header = ["student", "final acc", "best acc", f"mean last {last_k}", "compute ms", "round trip ms", "wait ms", "overhead ms"]
    rows = []
    for name, values in summary.items():
        rows.append(
            [
                name,
                _percent(values["final_val_accuracy"]),
                _percent(values["best_val_accuracy"]),
                _percent(values[f"mean_last_{last_k}_val_accuracy"]),
                *(
                    _milliseconds(values.get(f"mean_{key}", math.nan))
                    for key in ("compute_seconds", "round_trip_seconds", "wait_seconds", "exchange_overhead_seconds")
                ),
            ]
        )
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _milliseconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{1000 * value:.2f}"
