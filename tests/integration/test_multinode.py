"""A simulated three-node cluster on loopback: coordinator and students spread over the nodes, still training."""

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from rdml_dist.engines.ray_engine import CohortDoesNotFit, train_ray
from tests.integration.conftest import (
    assert_loopback_nodes,
    cohort_released,
    make_config,
    read_json,
    read_steps,
    simulated_cluster,
    wait_until,
)


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Cluster]:
    """A head and two worker nodes, one logical CPU each, all on 127.x; the driver joins it."""
    with simulated_cluster(workers=2) as cluster:
        yield cluster


@pytest.mark.timeout(120)
def test_strict_spread_places_one_student_per_node_and_trains(three_nodes: Cluster, tmp_path: Path) -> None:
    nodes = assert_loopback_nodes(3)
    students = [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}]
    config = make_config(tmp_path, students, training={"batch_size": 256}, ray={"placement_strategy": "STRICT_SPREAD"})
    run = train_ray(config, tmp_path, show_progress=False)
    run.finish()

    placements = read_json(tmp_path / "placements.json")
    node_ids = [placements["students"][name]["node_id"] for name in ("mlp", "cnn")] + [placements["coordinator"]["node_id"]]
    assert set(node_ids) == {node["NodeID"] for node in nodes}  # coordinator and students: one node each

    steps_per_epoch = math.ceil(round(1797 * 0.8) / 256)
    rows = read_steps(tmp_path)
    assert sorted((int(row["step"]), row["student"]) for row in rows) == sorted(
        (step, name) for step in range(steps_per_epoch) for name in ("mlp", "cnn")
    )
    assert all(float(row["mimicry_loss"]) > 0 for row in rows)
    summary = read_json(tmp_path / "results.json")["summary"]
    for name in ("mlp", "cnn", "ensemble"):
        assert summary[name]["final_val_accuracy"] > 0.2, (name, summary[name])  # chance is 0.1
    wait_until(cohort_released, "the cohort's placement group and CPUs are released")


@pytest.mark.timeout(60)
def test_strict_spread_with_more_bundles_than_nodes_does_not_fit(three_nodes: Cluster, tmp_path: Path) -> None:
    students = [{"name": f"s{index}", "model": "mlp"} for index in range(3)]
    config = make_config(
        tmp_path,
        students,
        ray={"placement_strategy": "STRICT_SPREAD", "cpus_per_student": 0.5, "placement_timeout_s": 3},
    )
    with pytest.raises(CohortDoesNotFit, match="STRICT_SPREAD"):
        train_ray(config, tmp_path / "run", show_progress=False)
    wait_until(cohort_released, "the failed reservation is removed")
