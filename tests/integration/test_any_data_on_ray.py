"""A text cohort through the CLI with its factories beside its config, and a streamed image folder on Ray."""

import json
import shutil
from pathlib import Path

import pytest

from rdml_dist.engines.local import train_local
from rdml_dist.engines.ray_engine import train_ray
from tests.integration.cli_process import REPOSITORY, run_cli
from tests.integration.conftest import make_config, read_steps
from tests.unit.data_files import write_imagefolder


def test_a_text_cohort_of_three_model_kinds_trains_through_the_cli_without_pythonpath(tmp_path: Path) -> None:
    experiment = tmp_path / "experiment"
    shutil.copytree(REPOSITORY / "examples" / "text_cohort", experiment)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(
        ["train", str(experiment / "cohort.yaml"), "--no-progress", "--run-dir", str(tmp_path / "run"),
         "--set", "training.epochs=2", "--set", "runtime.torch_threads=1", "--set", "monitoring.port=0",
         "--set", "rpc.port=0"],
        cwd=elsewhere, timeout_s=300, PYTHONPATH="",
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    accuracies = {name: results["summary"][name]["final_val_accuracy"] for name in ("fasttext", "textcnn", "bow-mlp")}
    assert all(accuracy > 0.5 for accuracy in accuracies.values()), accuracies  # 4 classes: chance is 0.25
    placements = json.loads((tmp_path / "run" / "placements.json").read_text())
    assert set(placements["students"]) == {"fasttext", "textcnn", "bow-mlp"}  # each a Ray actor importing text_models itself


@pytest.mark.usefixtures("ray_session")
def test_an_image_folder_past_the_memory_limit_streams_the_same_batches_to_every_student(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "images", ["a", "b", "c"], per_class=12, size=20)
    data = {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 16, "augment": True,
            "memory_limit_mb": 0.01, "workers": 1, "val_fraction": 0.25}
    students = [{"name": "cnn", "model": "small_cnn", "options": {"width": 8}}, {"name": "mlp", "model": "mlp"}]
    config = make_config(tmp_path / "ray", students, data=data, training={"epochs": 2, "batch_size": 8})
    ray_run = train_ray(config, tmp_path / "ray", show_progress=False)
    ray_run.finish()
    local_run = train_local(config.model_copy(update={"runtime": config.runtime.model_copy(update={"engine": "local"})}),
                            tmp_path / "local", show_progress=False)
    local_run.finish()
    ray_rows, local_rows = read_steps(tmp_path / "ray"), read_steps(tmp_path / "local")
    assert len(ray_rows) == len(local_rows) == 2 * 2 * 4  # every step of both students passed the batch hash check
    for ray_row, local_row in zip(ray_rows, local_rows):
        assert (ray_row["step"], ray_row["student"]) == (local_row["step"], local_row["student"])
        for column in ("ce_loss", "mimicry_loss"):  # the same crops read by other processes
            assert abs(float(ray_row[column]) - float(local_row[column])) <= 1e-4, (column, ray_row, local_row)
