"""Running per-student sums of one epoch's step records, so that an epoch's summary never rescans the run.

An epoch may span several chunks (``runtime.checkpoint.every_steps``); its sums so far travel in
the checkpoint manifest, which makes a resumed or rolled-back run summarise the epoch exactly as an
uninterrupted one: the same values added in the same order.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rdml_dist.messages import StepRecord

MEAN_COLUMNS = ("ce_loss", "mimicry_loss", "divergence", "compute_seconds", "round_trip_seconds", "wait_seconds",
                "coordinator_seconds")
COUNT_COLUMNS = ("correct", "labelled", "correct_clean", "rows")


@dataclass
class StudentTotals:
    """Sums and counts of one student's finite values (NaN means 'not measured' and is left out of a mean)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MEAN_COLUMNS, 0))
    finite: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MEAN_COLUMNS, 0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_COLUMNS, 0))
    steps: int = 0

    def add(self, record: StepRecord) -> None:
        for column in MEAN_COLUMNS:
            value = getattr(record, column)
            if not math.isnan(value):
                self.sums[column] += value
                self.finite[column] += 1
        for column in COUNT_COLUMNS:
            self.counts[column] += getattr(record, column)
        self.steps += 1

    def mean(self, column: str) -> float:
        return self.sums[column] / self.finite[column] if self.finite[column] else math.nan

    def summary(self) -> dict[str, float]:
        """Per-step means, train accuracy and the timing breakdown.

        ``exchange_overhead_seconds`` is the round trip minus the wait for the slowest peer and the
        coordinator's computation: what the transport itself costs per step.
        """
        round_trip = self.mean("round_trip_seconds")
        counts = self.counts
        return {
            "train_ce": self.mean("ce_loss"),
            "train_mimicry": self.mean("mimicry_loss"),
            "train_divergence": self.mean("divergence"),
            "train_accuracy": counts["correct"] / counts["labelled"] if counts["labelled"] else math.nan,
            "train_accuracy_clean": counts["correct_clean"] / counts["rows"],
            "compute_seconds": self.mean("compute_seconds"),
            "round_trip_seconds": round_trip,
            "wait_seconds": self.mean("wait_seconds"),
            "coordinator_seconds": self.mean("coordinator_seconds"),
            "exchange_overhead_seconds": (
                max(round_trip - self.mean("wait_seconds") - self.mean("coordinator_seconds"), 0.0)
                if not math.isnan(round_trip) else math.nan
            ),
            "steps": self.steps,
        }


@dataclass
class EpochTotals:
    """One epoch's totals per student, and the schedule values of its latest record."""

    students: dict[str, StudentTotals] = field(default_factory=dict)
    alpha: float = math.nan
    weight: float = math.nan

    def add(self, record: StepRecord) -> None:
        self.students.setdefault(record.student, StudentTotals()).add(record)
        self.alpha, self.weight = record.alpha, record.weight

    def summary(self) -> dict[str, dict[str, float]]:
        return {student: totals.summary() for student, totals in self.students.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy (non-finite floats as strings, so that they come back exactly)."""
        return _encode({"students": {name: asdict(totals) for name, totals in self.students.items()},
                        "alpha": self.alpha, "weight": self.weight})

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> "EpochTotals":
        saved = _decode(saved)
        students = {name: StudentTotals(**totals) for name, totals in saved["students"].items()}
        return cls(students, saved["alpha"], saved["weight"])


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    return value
