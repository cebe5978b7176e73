"""The run's summary (final, best and last-k mean validation accuracy, mean timings), kept up to date epoch by epoch.

``results.json`` is rewritten at every epoch; recomputing its summary from every epoch each time
would make a long run's epochs cost more and more. The running values here give the same numbers:
the same values, added in the same order.
"""

import math
from collections import deque
from typing import Any

TIMING_KEYS = ("compute_seconds", "round_trip_seconds", "wait_seconds", "exchange_overhead_seconds")


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


class _Series:
    """One student's (or the ensemble's) validation accuracy so far, and its mean timings."""

    def __init__(self, last_k: int, timed: bool) -> None:
        self.final: float | None = math.nan
        self.best = math.nan
        self.last_known: deque[float] = deque(maxlen=last_k)
        self.timing = {key: [0, 0] for key in TIMING_KEYS} if timed else {}  # sum and count of the known values

    def add(self, accuracy: float | None, timings: dict[str, Any]) -> None:
        self.final = accuracy
        if _known(accuracy):
            self.best = accuracy if math.isnan(self.best) else max(self.best, accuracy)
            self.last_known.append(accuracy)
        for key, total in self.timing.items():
            value = timings.get(key)
            if _known(value):
                total[0] += value
                total[1] += 1

    def result(self, last_k: int) -> dict[str, float | None]:
        values = {
            "final_val_accuracy": self.final,
            "best_val_accuracy": self.best,
            f"mean_last_{last_k}_val_accuracy": sum(self.last_known) / len(self.last_known) if self.last_known else math.nan,
        }
        for key, (total, count) in self.timing.items():
            values[f"mean_{key}"] = total / count if count else math.nan
        return values


class RunSummary:
    """Follows the epoch entries of ``results.json`` (``add``) and answers the summary at any time."""

    def __init__(self, students: list[str], last_k: int, epochs: list[dict[str, Any]] = ()) -> None:
        self.students, self.last_k = students, last_k
        self.series = {name: _Series(last_k, timed=True) for name in students}
        self.series["ensemble"] = _Series(last_k, timed=False)
        for entry in epochs:
            self.add(entry)

    def add(self, entry: dict[str, Any]) -> None:
        for name in self.students:
            self.series[name].add(entry["students"][name]["val_accuracy"], entry["students"][name])
        self.series["ensemble"].add(entry["ensemble_val_accuracy"], {})

    def result(self) -> dict[str, dict[str, float | None]]:
        return {name: series.result(self.last_k) for name, series in self.series.items()}
