"""A whole node dies under a student: Ray reschedules its bundle and actor on a spare node, the cohort rolls back."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from rdml_dist.engines.ray_engine import train_ray
from tests.integration.conftest import assert_loopback_nodes, make_config, read_json, simulated_cluster, wait_until

STUDENTS = [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}]


@pytest.fixture(scope="module")
def four_nodes() -> Iterator[Cluster]:
    """A head and three workers with one logical CPU each: one node more than the cohort's three bundles."""
    with simulated_cluster(workers=3) as cluster:
        yield cluster


@pytest.mark.timeout(300)
def test_a_dead_node_is_survived_by_rolling_back(four_nodes: Cluster, tmp_path: Path) -> None:
    assert_loopback_nodes(4)
    config = make_config(tmp_path, STUDENTS, training={"epochs": 2, "batch_size": 128},
                         ray={"placement_strategy": "SPREAD"}, runtime={"checkpoint": {"every_steps": 4}})
    outcome: list[BaseException | None] = []

    def train() -> None:
        try:
            train_ray(config, tmp_path, show_progress=False).finish()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    wait_until(lambda: (tmp_path / "checkpoints" / "step-00000004" / "manifest.json").exists(), "checkpoint 4", 120)
    placements = read_json(tmp_path / "placements.json")
    head = four_nodes.head_node.node_id
    victim = next(name for name in ("cnn", "mlp") if placements["students"][name]["node_id"] != head)
    lost_node = next(node for node in four_nodes.worker_nodes if node.node_id == placements["students"][victim]["node_id"])
    four_nodes.remove_node(lost_node)
    thread.join(240)
    assert not thread.is_alive() and outcome == [None], outcome

    results = read_json(tmp_path / "results.json")
    assert len(results["epochs"]) == 2
    (event,) = results["faults"]["events"]
    assert event["kind"] == "student_died" and event["student"] == victim and event["node"] == lost_node.node_id
    moved = read_json(tmp_path / "placements.json")["students"][victim]["node_id"]
    assert moved != lost_node.node_id  # restarted on another node
