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
