"""Fake GPUs: with GPUs in the cluster each student gets a whole one of its own (Ray sets CUDA_VISIBLE_DEVICES).

Ray only counts the declared GPUs; torch here sees no CUDA, so the students still train on CPU.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rdml_dist.engines.ray_engine import train_ray
from tests.integration.conftest import cohort_released, local_ray, make_config, read_json, read_steps, wait_until


@pytest.fixture(scope="module")
def three_fake_gpus() -> Iterator[None]:
    with local_ray(num_cpus=3, num_gpus=3):  # 3 × 0.5 CPU for the students, 1 for the coordinator
        yield


@pytest.mark.timeout(120)
def test_each_student_gets_its_own_gpu_by_default(three_fake_gpus: None, tmp_path: Path) -> None:
    assert not torch.cuda.is_available(), "this test simulates GPUs; it needs a machine where torch sees none"
    assert ray.cluster_resources()["GPU"] == 3
    students = [{"name": f"s{index}", "model": "mlp"} for index in range(3)]
    config = make_config(tmp_path, students, training={"batch_size": 512}, ray={"cpus_per_student": 0.5})
    assert config.runtime.ray.gpus_per_student is None  # the default: decided from the cluster
    run = train_ray(config, tmp_path, show_progress=False)
    run.finish()

    placements = read_json(tmp_path / "placements.json")["students"]
    assert set(placements) == {"s0", "s1", "s2"}
    gpu_ids = [placement["gpu_ids"] for placement in placements.values()]
    assert all(len(ids) == 1 for ids in gpu_ids), gpu_ids
    assert sorted(ids[0] for ids in gpu_ids) == ["0", "1", "2"]
    for placement in placements.values():
        assert placement["cuda_visible_devices"] == placement["gpu_ids"][0]
        assert placement["device"] == "cpu"
    assert {int(row["step"]) for row in read_steps(tmp_path)} == {0, 1, 2}
    assert read_json(tmp_path / "results.json")["summary"]["ensemble"]["final_val_accuracy"] > 0.1  # chance is 0.1
    # Every GPU (and CPU) is given back when the cohort is done.
    wait_until(cohort_released, "the cohort's placement group and GPUs are released")


@pytest.mark.timeout(120)
def test_small_students_share_a_gpu_while_a_large_one_has_its_own(three_fake_gpus: None, tmp_path: Path) -> None:
    students = [
        {"name": "small0", "model": "mlp", "resources": {"gpus": 0.5}},
        {"name": "small1", "model": "mlp", "resources": {"gpus": 0.5}},
        {"name": "large", "model": "small_cnn", "resources": {"gpus": 1, "cpus": 0.25}},
    ]
    config = make_config(tmp_path, students, training={"batch_size": 512}, ray={"cpus_per_student": 0.5})
    run = train_ray(config, tmp_path, show_progress=False)
    run.finish()

    placements = read_json(tmp_path / "placements.json")["students"]
    held = {name: placement["resources"] for name, placement in placements.items()}
    assert held == {"small0": {"CPU": 0.5, "GPU": 0.5}, "small1": {"CPU": 0.5, "GPU": 0.5},
                    "large": {"CPU": 0.25, "GPU": 1.0}}, held
    gpu_ids = {name: placement["gpu_ids"] for name, placement in placements.items()}
    assert all(len(ids) == 1 for ids in gpu_ids.values()), gpu_ids
    assert gpu_ids["large"][0] not in gpu_ids["small0"] + gpu_ids["small1"], gpu_ids
    # Each student's wait for the slowest peer is reported, so a user can see whom to give more.
    summary = read_json(tmp_path / "results.json")["summary"]
    assert all(summary[name]["mean_wait_seconds"] >= 0 for name in placements)
    wait_until(cohort_released, "the cohort's placement group and GPUs are released")
