"""A simulated two-node Ray cluster on loopback with the dashboard (Ray's state API answers through it),
and the small noisy-digits sweep the Ray Tune tests run on it."""

import json
from pathlib import Path
from typing import Any

from rdml_dist.tune.sweep import SweepConfig
from tests.integration.conftest import simulated_cluster


def two_node_cluster() -> Any:
    """A head and one worker node, 4 logical CPUs each (two trials of 3.5 CPUs side by side), with the dashboard."""
    return simulated_cluster(workers=1, cpus=4, dashboard=True)


def noisy_digits(epochs: int = 2, **training: Any) -> dict[str, Any]:
    """Digits with 30% label noise, an MLP and a CNN on one torch thread each: a cohort of 3 CPUs with its driver."""
    return {
        "name": "noisy-digits",
        "seed": 0,
        "data": {"name": "digits", "val_fraction": 0.2, "label_noise": 0.3},
        "students": [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}],
        "training": {"epochs": epochs, "batch_size": 256, "last_epochs_reported": 1,
                     "optimizer": {"name": "sgd", "lr": 0.05}, **training},
        "mimicry": {"divergence": "renyi", "alpha": 2.0},
        "runtime": {"engine": "ray", "torch_threads": 1, "coordinator": {"cpus": 0.5},
                    "ray": {"placement_timeout_s": 120, "exchange_timeout_s": 120}},
    }


def sweep_of(storage: Path, space: dict[str, Any], **settings: Any) -> SweepConfig:
    return SweepConfig.model_validate({"name": "sweep", "base": noisy_digits(), "space": space,
                                       "storage": str(storage), **settings})


def placements(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "placements.json").read_text())


def cohort_pids(run_dir: Path) -> set[int]:
    """The pids of a run's students and coordinator, as the run recorded them."""
    where = placements(run_dir)
    return {student["pid"] for student in where["students"].values()} | {where["coordinator"]["pid"]}
