"""What the coordinator records: one row per student and step, one evaluation per epoch.

Shared by the coordinator core, its shards, the metrics, the epoch loop and the run directory.
"""

import math
from dataclasses import dataclass, field


@dataclass
class StepRecord:
    """One student's numbers for one step (a row of ``steps.csv``)."""

    step: int
    epoch: int
    student: str
    ce_loss: float
    mimicry_loss: float
    divergence: float
    alpha: float
    weight: float
    correct: int
    labelled: int
    correct_clean: int
    rows: int
    wait_seconds: float
    coordinator_seconds: float
    compute_seconds: float = math.nan
    round_trip_seconds: float = math.nan


@dataclass
class EpochEvaluation:
    """Validation accuracy of each student and of the cohort ensemble (mean of probabilities)."""

    epoch: int
    accuracy: dict[str, float]
    ensemble_accuracy: float
    members: list[str] = field(default_factory=list)
