"""The in-process reference trainer: trajectories, limits of the method, and the run directory it writes."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines import resume_cohort
from rdml_dist.engines.local import train_local
from rdml_dist.run_records.storage import Storage
from rdml_dist.students.student import Student


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
    return step_rows(Path(run.location))


def assert_same_trajectory(first: list[dict[str, str]], second: list[dict[str, str]], tolerance: float) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert (a["step"], a["student"]) == (b["step"], b["student"])
        for column in ("ce_loss", "mimicry_loss"):
            assert abs(float(a[column]) - float(b[column])) <= tolerance, (column, a, b)


def test_renyi_beside_alpha_one_follows_the_kl_trajectory(tmp_path: Path) -> None:
    """The Rényi formula at α = 1.001 and the KL branch (α = 1) are different code paths; training must agree."""
    renyi = train(tiny_cohort(tmp_path, "renyi1", epochs=2, divergence="renyi", alpha=1.001))
    kl = train(tiny_cohort(tmp_path, "kl", epochs=2, divergence="kl"))
    assert_same_trajectory(renyi, kl, 2e-3)
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
    run_dir = Path(run.location)
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["epoch"] for entry in results["epochs"]] == [0, 1]
    for entry in results["epochs"]:
        assert set(entry["students"]) == {"mlp", "cnn"}
        assert 0.0 <= entry["ensemble_val_accuracy"] <= 1.0
        assert entry["students"]["cnn"]["train_ce"] > 0
    summary = results["summary"]
    assert summary["ensemble"]["final_val_accuracy"] == results["epochs"][-1]["ensemble_val_accuracy"]
    assert summary["mlp"]["final_val_accuracy"] > 0.5  # well above the 10% of chance on digits
    assert "ensemble" in table and "mlp" in table and (run_dir / "results.txt").read_text().strip() == table
    rows = step_rows(run_dir)
    assert len(rows) == 2 * 2 * 12  # students × epochs × ceil(1437 / 128)
    assert all(float(row["compute_seconds"]) > 0 for row in rows)
    saved = yaml_config(run_dir)
    assert saved["mimicry"]["alpha"] == config.mimicry.alpha


def yaml_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    config = tiny_cohort(tmp_path, "whole", epochs=2)
    whole = train_local(config, tmp_path / "whole", show_progress=False)
    whole.finish()
    interrupted = tiny_cohort(tmp_path, "cut", epochs=2)
    raw = interrupted.model_dump()
    raw["runtime"]["checkpoint"] = {"every_steps": 5, "keep": 3}
    train_local(parse_config(raw), tmp_path / "cut", show_progress=False).finish()
    # As if the driver died after committing step 20: the final checkpoint never got written.
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000024")
    assert CheckpointStore(Storage(str(tmp_path / "cut"))).latest()["step"] == 20
    resumed = resume_cohort(str(tmp_path / "cut"), show_progress=False)
    resumed.finish()

    assert _same_except_timing(tmp_path)
    first, second = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "cut"))
    for entry_whole, entry_cut in zip(first["epochs"], second["epochs"], strict=True):
        assert entry_cut["ensemble_val_accuracy"] == entry_whole["ensemble_val_accuracy"]
        for name in ("mlp", "cnn"):
            for key in ("val_accuracy", "train_ce", "train_mimicry", "train_accuracy"):
                assert entry_cut["students"][name][key] == entry_whole["students"][name][key], (name, key)
    for name in ("mlp", "cnn"):
        final_whole = torch.load(tmp_path / "whole" / "checkpoints" / "step-00000024" / f"{name}.pt", weights_only=True)
        final_cut = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000024" / f"{name}.pt", weights_only=True)
        assert final_cut["epoch"] == final_whole["epoch"] == 2
        for key, tensor in final_whole["model"].items():
            assert torch.equal(final_cut["model"][key], tensor), (name, key)


def _same_except_timing(tmp_path: Path) -> bool:
    """steps.csv of both runs agree in every column but the measured seconds."""
    timing = {"wait_seconds", "coordinator_seconds", "compute_seconds", "round_trip_seconds"}
    whole, cut = step_rows(tmp_path / "whole"), step_rows(tmp_path / "cut")
    return len(whole) == len(cut) and all(
        {key: value for key, value in a.items() if key not in timing} == {key: value for key, value in b.items() if key not in timing}
        for a, b in zip(whole, cut)
    )


def test_a_checkpoint_belongs_to_its_student(tmp_path: Path) -> None:
    config = tiny_cohort(tmp_path, "owner")
    state = Student(config, 1).state_dict()
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


def test_hidden_labels_leave_the_cross_entropy_a_mean_over_the_labelled_rows(tmp_path: Path) -> None:
    """CE is averaged over a batch's labelled rows only (none: 0); the mimicry term stays a mean over all B rows."""
    raw = tiny_cohort(tmp_path, "semi-ce").model_dump()
    raw["data"]["unlabeled_fraction"] = 0.5
    raw["students"] = [{"name": "plain", "model": "mlp", "options": {"hidden": [16], "dropout": 0.0}}]
    student = Student(parse_config(raw), 0)
    indices, (inputs, labels) = student._training_batch(0, 0)
    frame = student.forward_step(0)
    with torch.no_grad():
        logits = student.model(inputs)
    known = labels >= 0
    assert 0 < int(known.sum()) < len(labels) and frame.labelled == int(known.sum())
    assert frame.ce_loss == pytest.approx(float(F.cross_entropy(logits[known], labels[known])), rel=1e-5)
    assert frame.ce_loss != pytest.approx(float(F.cross_entropy(logits[known], labels[known], reduction="sum") / len(labels)), rel=1e-3)
    student.discard_pending()
    student.dataset.train.labels[indices] = -1  # a batch with no label at all: mimicry only
    assert student.forward_step(0).ce_loss == 0.0


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_precision_frames_carry_that_dtype_and_stay_close_to_float32(tmp_path: Path, wire: str) -> None:
    raw = tiny_cohort(tmp_path, f"wire-{wire}").model_dump()
    raw["runtime"]["exchange"] = {"dtype": wire}
    config = parse_config(raw)
    frame = Student(config, 0).forward_step(0)
    assert frame.logits.dtype == getattr(torch, wire)
    exact = {(row["step"], row["student"]): row for row in train(tiny_cohort(tmp_path, "wire-float32"))}
    rounded = {(row["step"], row["student"]): row for row in train(config)}
    assert rounded.keys() == exact.keys()
    gaps = [abs(float(rounded[key]["mimicry_loss"]) - float(exact[key]["mimicry_loss"])) for key in exact]
    scale = max(float(row["mimicry_loss"]) for row in exact.values())
    assert 0 < max(gaps) < 0.05 * scale, (max(gaps), scale)  # rounded on the wire, yet the same training
