"""A simulated two-node Ray cluster on loopback with the dashboard (Ray's state API answers through it),
and the small noisy-digits sweep the Ray Tune tests run on it."""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from rdml_dist.tune.sweep import SweepConfig
from tests.integration.cli_process import free_port
from tests.integration.conftest import wait_until_stopped


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 4) -> Iterator[Any]:
    """A head and one worker node, ``cpus_per_node`` logical CPUs each, all on 127.x; the driver joins it."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "a previous test module left Ray running"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": True, "dashboard_port": free_port(),
    })
    nodes = list(cluster.list_all_nodes())
    try:
        nodes.append(cluster.add_node(num_cpus=cpus_per_node))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for node in nodes:
            wait_until_stopped(node)


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
