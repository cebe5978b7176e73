"""The in-process reference trainer: trajectories, limits of the method, and the run directory it writes."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines.local import train_local
from rdml_dist.student import Student


def tiny_cohort(tmp_path: Path, name: str, epochs: int = 1, **mimicry: object) -> ExperimentConfig:
    return parse_config(
        {
            "name": name,
            "seed": 3,
            "students": [{"model": "mlp", "name": "mlp"}, {"model": "small_cnn", "name": "cnn", "options": {"width": 8}}],
            "training": {"epochs": epochs, "batch_size": 128, "optimizer": {"lr": 0.05}},
            "mimicry": mimicry,
            "runtime": {"engine": "local", "run_dir": str(tmp_path / name), "torch_threads": 1},
        }
    )


def step_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "steps.csv").open() as handle:
        return list(csv.DictReader(handle))


def train(config: ExperimentConfig) -> list[dict[str, str]]:
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    run.finish()
    return step_rows(run.path)


def assert_same_trajectory(first: list[dict[str, str]], second: list[dict[str, str]], tolerance: float) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert (a["step"], a["student"]) == (b["step"], b["student"])
        for column in ("ce_loss", "mimicry_loss"):
            assert abs(float(a[column]) - float(b[column])) <= tolerance, (column, a, b)


def test_renyi_at_alpha_one_follows_the_kl_trajectory(tmp_path: Path) -> None:
    renyi = train(tiny_cohort(tmp_path, "renyi1", epochs=2, divergence="renyi", alpha=1.0))
    kl = train(tiny_cohort(tmp_path, "kl", epochs=2, divergence="kl"))
    assert_same_trajectory(renyi, kl, 1e-5)
    assert max(float(row["mimicry_loss"]) for row in kl) > 1e-3  # mimicry really acted


def test_alpha_zero_is_the_same_as_no_mimicry(tmp_path: Path) -> None:
    alpha_zero = train(tiny_cohort(tmp_path, "a0", alpha=0.0))
    no_weight = train(tiny_cohort(tmp_path, "w0", alpha=2.0, weight=0.0))
    assert_same_trajectory(alpha_zero, no_weight, 1e-5)
    mimicking = train(tiny_cohort(tmp_path, "a2", alpha=2.0))
    later_ce = [abs(float(a["ce_loss"]) - float(b["ce_loss"])) for a, b in zip(mimicking[4:], no_weight[4:])]
    assert max(later_ce) > 1e-4  # a real mimicry term changes the trajectory


def test_run_directory_contents(tmp_path: Path) -> None:
    config = tiny_cohort(tmp_path, "contents", epochs=2)
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    table = run.finish()
    results = json.loads((run.path / "results.json").read_text())
    assert [entry["epoch"] for entry in results["epochs"]] == [0, 1]
    for entry in results["epochs"]:
        assert set(entry["students"]) == {"mlp", "cnn"}
        assert 0.0 <= entry["ensemble_val_accuracy"] <= 1.0
        assert entry["students"]["cnn"]["train_ce"] > 0
    summary = results["summary"]
    assert summary["ensemble"]["final_val_accuracy"] == results["epochs"][-1]["ensemble_val_accuracy"]
    assert summary["mlp"]["final_val_accuracy"] > 0.5  # well above the 10% of chance on digits
    assert "ensemble" in table and "mlp" in table and (run.path / "results.txt").read_text().strip() == table
    rows = step_rows(run.path)
    assert len(rows) == 2 * 2 * 12  # students × epochs × ceil(1437 / 128)
    assert all(float(row["compute_seconds"]) > 0 for row in rows)
    saved = yaml_config(run.path)
    assert saved["mimicry"]["alpha"] == config.mimicry.alpha


def yaml_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_checkpoint_restores_a_student_exactly(tmp_path: Path) -> None:
    config = tiny_cohort(tmp_path, "ckpt")
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    run.finish()
    state = torch.load(run.path / "checkpoints" / "cnn.pt", weights_only=False)
    assert state["epoch"] == 1
    restored = Student(config, 1)
    restored.load_state_dict(state)
    fresh = Student(config, 1)
    images, _ = restored.dataset.val.batch(torch.arange(16))
    restored.model.eval(), fresh.model.eval()
    assert not torch.allclose(restored.model(images), fresh.model(images))
    with pytest.raises(ValueError, match="belongs to student 'cnn'"):
        Student(config, 0).load_state_dict(state)


@pytest.mark.parametrize("divergence,mode", [("js", "pairwise"), ("mse_logits", "ensemble"), ("renyi", "ensemble")])
def test_other_divergences_and_modes_train(tmp_path: Path, divergence: str, mode: str) -> None:
    rows = train(tiny_cohort(tmp_path, f"{divergence}-{mode}", divergence=divergence, mode=mode, alpha=0.5))
    values = [float(row["mimicry_loss"]) for row in rows]
    assert all(value >= 0 for value in values) and max(values) > 0


def test_semi_supervised_samples_get_mimicry_only(tmp_path: Path) -> None:
    config = tiny_cohort(tmp_path, "semi")
    raw = config.model_dump()
    raw["data"]["unlabeled_fraction"] = 0.5
    rows = train(parse_config(raw))
    full_batches = [row for row in rows if int(row["step"]) < 11]
    labelled = [int(row["labelled"]) for row in full_batches]
    assert all(40 <= count <= 90 for count in labelled), labelled  # about half of 128
    assert all(float(row["mimicry_loss"]) > 0 for row in rows)
