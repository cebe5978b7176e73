"""The run directory: resolved config, per-step log, per-epoch results (JSON + table) and fault events.

It lives in the run's :class:`~rdml_dist.run_records.storage.Storage` (local, shared or object store) and
every file is written all at once, so a crash never leaves a truncated file behind. What a
checkpoint writes is proportional to its chunk, never to the run: the chunk's step rows become
one new part of the step log (:mod:`rdml_dist.run_records.step_log`), ``results.json`` is rewritten only when
an epoch or a fault was added, and the manifest holds the position and the open epoch's sums.
Checkpoints live beside these files and are managed by :mod:`rdml_dist.run_records.checkpoints`.
"""

import json
import math
from collections import defaultdict
from typing import Any

import yaml

from rdml_dist.run_records import step_log
from rdml_dist.run_records.checkpoints import CHECKPOINTS
from rdml_dist.config import ExperimentConfig
from rdml_dist.run_records.epoch_totals import EpochTotals
from rdml_dist.run_records.run_summary import RunSummary
from rdml_dist.errors import ConfigError
from rdml_dist.messages import EpochEvaluation, StepRecord
from rdml_dist.run_records.step_log import WHOLE_LOG as STEP_LOG
from rdml_dist.run_records.step_log import read_step_log
from rdml_dist.run_records.storage import Storage

__all__ = ["STEP_LOG", "RunDirectory", "format_table", "read_step_log"]

RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.txt"
CONFIG_FILE = "config.yaml"
PLACEMENTS_JSON = "placements.json"
TENSORBOARD_DIR = "tensorboard"  # written by rdml_dist.run_records.tensorboard_events
PLOTS_DIR = "plots"  # written by rdml_dist.run_records.plots


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

    Only the rows since the last checkpoint are held in memory (``rows``); each epoch's summary is
    summed as its rows arrive. The files always describe a prefix of the run that a checkpoint can
    continue, plus every fault event seen, those of chunks that were rolled back included.
    """

    def __init__(self, storage: Storage, config: ExperimentConfig, engine: str, resume_from: dict[str, Any] | None = None) -> None:
        self.storage = storage
        self.config = config
        self.engine = engine
        self.rows: list[StepRecord] = []
        self.epochs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._epoch_texts: list[str] = []  # each epoch's entry as JSON, encoded once
        self._summary = RunSummary(config.student_names(), config.training.last_epochs_reported)
        self._open_epochs: dict[int, EpochTotals] = {}
        self._results_stale = False
        self._table: str | None = None
        if resume_from is not None:
            epochs, self.events = self._saved_results(resume_from)
            self._set_epochs(epochs)
            self._restore_position(resume_from)

    def _saved_results(self, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The epochs up to the checkpoint and every fault event, from ``results.json`` (or an older manifest)."""
        if "epochs" in manifest:  # a manifest written before results.json held them
            return list(manifest["epochs"]), list(manifest["events"])
        if not self.storage.exists(RESULTS_JSON):
            if manifest["epochs_done"] == 0:
                return [], []
            raise ConfigError("--resume", f"{self.storage.describe(RESULTS_JSON)} is missing: the run's results cannot be restored")
        results = json.loads(self.storage.read_bytes(RESULTS_JSON))
        if len(results["epochs"]) < manifest["epochs_done"]:
            raise ConfigError("--resume", f"{self.storage.describe(RESULTS_JSON)} holds {len(results['epochs'])} epochs, "
                                          f"fewer than the {manifest['epochs_done']} of the checkpoint at step {manifest['step']}")
        return results["epochs"][:manifest["epochs_done"]], results["faults"]["events"]

    def _set_epochs(self, epochs: list[dict[str, Any]]) -> None:
        self.epochs = list(epochs)
        self._epoch_texts = [json.dumps(_json_safe(entry)) for entry in self.epochs]
        self._summary = RunSummary(self.config.student_names(), self.config.training.last_epochs_reported, self.epochs)

    def _restore_position(self, manifest: dict[str, Any]) -> None:
        """Step log, open epochs and pending rows as they were at the checkpoint ``manifest``."""
        step = manifest["step"]
        self.rows = [row for row in self.rows if row.step < step]
        self._open_epochs = {int(epoch): EpochTotals.from_json(saved) for epoch, saved in manifest.get("open_epochs", {}).items()}
        step_log.truncate(self.storage, step)

    def write_config(self) -> None:
        """Begin a fresh run's files: remove what an earlier run left here, then save the validated config and empty results.

        The loop calls this once the cohort is up, so ``--overwrite`` deletes the replaced run's
        checkpoints and logs only when the new run has really started. The saved config (defaults
        filled in) is what ``--resume`` continues with, less ``rpc.token``: a credential is never written to
        the run's storage (a resume reads it from ``rpc.token_env`` or its config again).
        """
        for leftover in (CHECKPOINTS, RESULTS_JSON, RESULTS_TABLE, TENSORBOARD_DIR, PLOTS_DIR):
            self.storage.delete(leftover)
        step_log.clear(self.storage)
        config_text = yaml.safe_dump(self.config.without_credentials(), sort_keys=False).encode()
        self.storage.write_bytes(CONFIG_FILE, config_text)
        self.write_results()  # no epoch yet: what a resume before the first epoch's end reads

    @property
    def location(self) -> str:
        return self.storage.describe()

    def add_records(self, records: list[StepRecord]) -> None:
        """Hold the chunk's rows until its checkpoint and add them to their epoch's sums."""
        self.rows.extend(records)
        for record in records:
            self._open_epochs.setdefault(record.epoch, EpochTotals()).add(record)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Fault events (failures, rollbacks, non-finite losses): written to ``results.json`` at once, kept for good."""
        if events:
            self.events.extend(events)
            self._results_stale = True  # a write that fails now is done again with the next progress
            self.write_results()

    def rollback(self, manifest: dict[str, Any]) -> None:
        """Forget the steps and epochs after a checkpoint the cohort went back to (fault events stay)."""
        self._set_epochs(self.epochs[:manifest["epochs_done"]])
        self._restore_position(manifest)
        self._results_stale = True

    def record_epoch(self, epoch: int, evaluation: EpochEvaluation, seconds: float) -> dict[str, Any]:
        """Summarise the epoch's steps with its scores and rewrite ``results.json``; returns the epoch entry."""
        totals = self._open_epochs.pop(epoch, EpochTotals())
        training = totals.summary()
        entry = {
            "epoch": epoch,
            "seconds": seconds,
            "alpha": totals.alpha,
            "mimicry_weight": totals.weight,
            "ensemble_val_accuracy": evaluation.ensemble_accuracy,
            "students": {
                name: {**training.get(name, {}), "val_accuracy": evaluation.accuracy.get(name, math.nan)}
                for name in self.config.student_names()
            },
        }
        self.epochs.append(entry)
        self._epoch_texts.append(json.dumps(_json_safe(entry)))
        self._summary.add(entry)
        self.write_results()
        return entry

    def manifest(self, step: int, live: list[str]) -> dict[str, Any]:
        """The cohort part of a checkpoint: position, members and the open epoch's sums (results are in ``results.json``)."""
        return {
            "step": step,
            "epochs_done": len(self.epochs),
            "members": self.config.student_names(),
            "live": live,
            "engine": self.engine,
            "results": RESULTS_JSON,
            "open_epochs": {str(epoch): totals.to_json() for epoch, totals in self._open_epochs.items()},
        }

    def write_progress(self) -> None:
        """Before a checkpoint's manifest: the chunk's rows as a new part of the step log, and the results if they changed.

        Once the last epoch is in, the parts are also joined into ``steps.csv``, the whole log in one file.
        """
        step_log.write_part(self.storage, self.rows)
        self.rows = []
        if self._results_stale:
            self.write_results()
        if len(self.epochs) >= self.config.training.epochs:
            step_log.write_whole_log(self.storage)

    def summary(self) -> dict[str, Any]:
        """Final, best and last-k-mean validation accuracy per student and for the ensemble (the papers' score)."""
        return self._summary.result()

    def fault_counts(self) -> dict[str, int]:
        """How many of each fault event the run went through."""
        counts: dict[str, int] = defaultdict(int)
        for event in self.events:
            counts[event["kind"]] += 1
        return dict(counts)

    def write_results(self) -> None:
        """Rewrite ``results.json``: one line per epoch (each encoded once, when it was scored), then summary and faults."""
        head = {"name": self.config.name, "engine": self.engine, "students": self.config.student_names()}
        tail = {"summary": self.summary(), "faults": {"counts": self.fault_counts(), "events": self.events}}
        members = [f"{json.dumps(key)}: {json.dumps(_json_safe(value))}" for key, value in head.items()]
        members.append('"epochs": [' + ",".join(f"\n    {text}" for text in self._epoch_texts) + "\n  ]")
        members += [f"{json.dumps(key)}: {json.dumps(_json_safe(value))}" for key, value in tail.items()]
        document = "{\n  " + ",\n  ".join(members) + "\n}\n"
        self.storage.write_bytes(RESULTS_JSON, document.encode())
        self._results_stale = False

    def write_placements(self, students: dict[str, dict[str, Any]], coordinator: dict[str, Any]) -> None:
        """Record where each student and the coordinator run (node, GPU ids, device, pid) in ``placements.json``."""
        document = {"students": students, "coordinator": coordinator}
        self.storage.write_bytes(PLACEMENTS_JSON, json.dumps(document, indent=2).encode())

    def finish(self) -> str:
        """Write the readable table (once: the session writes it before it lets the run go) and return it."""
        if self._table is None:
            table = format_table(self.summary(), self.config.training.last_epochs_reported)
            self.storage.write_bytes(RESULTS_TABLE, (table + "\n").encode())
            self._table = table
        return self._table


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
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _milliseconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{1000 * value:.2f}"
