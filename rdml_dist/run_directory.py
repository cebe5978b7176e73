"""The run directory: resolved config, per-step log, per-epoch results (JSON + table) and fault events.

It lives in the run's :class:`~rdml_dist.storage.Storage` (local, shared or object store) and
every file is replaced all at once, so a crash never leaves a truncated file behind. Checkpoints
live beside these files and are managed by :mod:`rdml_dist.checkpoints`.
"""

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import Any

import yaml

from rdml_dist.config import ExperimentConfig
from rdml_dist.messages import EpochEvaluation, StepRecord
from rdml_dist.storage import Storage

STEP_LOG = "steps.csv"
RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.txt"
CONFIG_FILE = "config.yaml"
PLACEMENTS_JSON = "placements.json"


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
            "train_accuracy_clean": sum(row.correct_clean for row in rows) / sum(row.rows for row in rows),
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
    """Owns one run's files in its storage; the epoch loop feeds it step records, evaluations and fault events.

    Step rows are kept in memory and ``steps.csv`` is rewritten whole (atomically) at every
    checkpoint, so the files always describe a prefix of the run that a checkpoint can continue.
    """

    def __init__(self, storage: Storage, config: ExperimentConfig, engine: str, resume_from: dict[str, Any] | None = None) -> None:
        self.storage = storage
        self.config = config
        self.engine = engine
        self.rows: list[StepRecord] = []
        self.epochs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        if resume_from is not None:
            self.rows = [row for row in read_step_log(storage) if row.step < resume_from["step"]]
            self.epochs = list(resume_from["epochs"])
            self.events = list(resume_from["events"])

    def write_config(self) -> None:
        """Save the validated config (defaults filled in): what ``--resume`` continues with."""
        config_text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False).encode()
        self.storage.write_bytes(CONFIG_FILE, config_text)

    @property
    def location(self) -> str:
        return self.storage.describe()

    def add_records(self, records: list[StepRecord]) -> None:
        self.rows.extend(records)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Fault events (failures, rollbacks, non-finite losses): kept in ``results.json`` and in every manifest."""
        self.events.extend(events)

    def rollback(self, manifest: dict[str, Any]) -> None:
        """Forget the steps and epochs after a checkpoint the cohort went back to (fault events stay)."""
        self.rows = [row for row in self.rows if row.step < manifest["step"]]
        self.epochs = list(manifest["epochs"])

    def record_epoch(self, epoch: int, evaluation: EpochEvaluation, seconds: float) -> dict[str, Any]:
        """Summarise the epoch's steps with its scores and rewrite ``results.json``; returns the epoch entry."""
        records = [row for row in self.rows if row.epoch == epoch]
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

    def manifest(self, step: int, live: list[str]) -> dict[str, Any]:
        """The cohort part of a checkpoint: position, members, and the results written so far."""
        return _json_safe({
            "step": step,
            "epochs_done": len(self.epochs),
            "members": self.config.student_names(),
            "live": live,
            "engine": self.engine,
            "epochs": self.epochs,
            "events": self.events,
        })

    def write_progress(self) -> None:
        """Rewrite ``steps.csv`` and ``results.json`` from memory (before a checkpoint's manifest)."""
        lines = io.StringIO()
        writer = csv.writer(lines)
        writer.writerow([column.name for column in fields(StepRecord)])
        for row in self.rows:
            writer.writerow(list(asdict(row).values()))
        self.storage.write_bytes(STEP_LOG, lines.getvalue().encode())
        self.write_results()

    def summary(self) -> dict[str, Any]:
        """Final, best and last-k-mean validation accuracy per student and for the ensemble (the papers' score)."""
        last_k = self.config.training.last_epochs_reported
        series = {name: [entry["students"][name]["val_accuracy"] for entry in self.epochs] for name in self.config.student_names()}
        series["ensemble"] = [entry["ensemble_val_accuracy"] for entry in self.epochs]
        timing_keys = ("compute_seconds", "round_trip_seconds", "wait_seconds", "exchange_overhead_seconds")
        result = {}
        for name, accuracies in series.items():
            known = [value for value in accuracies if value is not None and not math.isnan(value)]
            result[name] = {
                "final_val_accuracy": accuracies[-1] if accuracies else math.nan,
                "best_val_accuracy": max(known, default=math.nan),
                f"mean_last_{last_k}_val_accuracy": _mean(known[-last_k:]),
            }
            if name != "ensemble":
                for key in timing_keys:
                    values = (entry["students"][name].get(key) for entry in self.epochs)
                    result[name][f"mean_{key}"] = _mean(math.nan if value is None else value for value in values)
        return result

    def fault_counts(self) -> dict[str, int]:
        """How many of each fault event the run went through."""
        counts: dict[str, int] = defaultdict(int)
        for event in self.events:
            counts[event["kind"]] += 1
        return dict(counts)

    def write_results(self) -> None:
        document = {
            "name": self.config.name,
            "engine": self.engine,
            "students": self.config.student_names(),
            "epochs": self.epochs,
            "summary": self.summary(),
            "faults": {"counts": self.fault_counts(), "events": self.events},
        }
        self.storage.write_bytes(RESULTS_JSON, json.dumps(_json_safe(document), indent=2).encode())

    def write_placements(self, students: dict[str, dict[str, Any]], coordinator: dict[str, Any]) -> None:
        """Record where each student and the coordinator run (node, GPU ids, device, pid) in ``placements.json``."""
        document = {"students": students, "coordinator": coordinator}
        self.storage.write_bytes(PLACEMENTS_JSON, json.dumps(document, indent=2).encode())

    def finish(self) -> str:
        """Write the readable table and return it."""
        table = format_table(self.summary(), self.config.training.last_epochs_reported)
        self.storage.write_bytes(RESULTS_TABLE, (table + "\n").encode())
        return table


def read_step_log(storage: Storage) -> list[StepRecord]:
    """The rows of a run's ``steps.csv`` as records (empty when the run wrote none yet)."""
    if not storage.exists(STEP_LOG):
        return []
    columns = fields(StepRecord)
    reader = csv.DictReader(io.StringIO(storage.read_bytes(STEP_LOG).decode()))
    return [StepRecord(**{column.name: column.type(row[column.name]) for column in columns}) for row in reader]


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
