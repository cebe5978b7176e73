"""``mimicry.update: sequential`` is DML's Algorithm 1 on one mini-batch, checked against a plain PyTorch loop."""

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.data import augment_seed, batch_plan
from rdml_dist.divergence import divergence
from rdml_dist.engines.local import train_local
from rdml_dist.errors import ConfigError
from rdml_dist.students.student import Student


def cohort(tmp_path: Path, update: str) -> ExperimentConfig:
    return parse_config({
        "name": update,
        "seed": 4,
        "students": [{"name": "mlp", "model": "mlp", "options": {"hidden": [32]}},
                     {"name": "cnn", "model": "small_cnn", "options": {"width": 8}},
                     {"name": "wide", "model": "mlp", "options": {"hidden": [64]}}],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.1}},
        "mimicry": {"divergence": "renyi", "alpha": 2.0, "weight": 0.7, "update": update},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / update), "torch_threads": 1},
        "monitoring": {"port": 0},
    })


def trained_rows(config: ExperimentConfig) -> list[dict[str, str]]:
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    run.finish()
    with (Path(run.location) / "steps.csv").open() as handle:
        return list(csv.DictReader(handle))


def algorithm_one(config: ExperimentConfig) -> list[tuple[int, str, float, float]]:
    """DML Algorithm 1 written out: all predict, then each in turn updates against its peers' latest
    predictions and predicts the same batch again. Autograd on the divergence, no closed form."""
    students = [Student(config, index) for index in range(len(config.students))]
    mimicry = config.mimicry
    rows = []
    for step, indices in enumerate(batch_plan(len(students[0].dataset.train), config.training.batch_size, config.seed, 0)):
        inputs, labels = students[0].dataset.train.batch(indices, augment_seed(config.seed, 0, step))
        for student in students:
            student.model.train()
        logits = [student.model(inputs) for student in students]
        latest = [output.detach() for output in logits]
        for k, student in enumerate(students):
            ce = F.cross_entropy(logits[k], labels)
            peers = [latest[j] for j in range(len(students)) if j != k]
            mimicry_loss = mimicry.weight * sum(divergence("renyi", peer, logits[k], alpha=mimicry.alpha) for peer in peers) / len(peers)
            student.optimizer.zero_grad()
            (ce + mimicry_loss).backward()
            student.optimizer.step()
            with torch.no_grad():
                latest[k] = student.model(inputs)
            rows.append((step, student.name, float(ce.detach()), float(mimicry_loss.detach())))
    return rows


def test_sequential_updates_follow_algorithm_one(tmp_path: Path) -> None:
    config = cohort(tmp_path, "sequential")
    engine = trained_rows(config)
    reference = algorithm_one(config)
    assert [(int(row["step"]), row["student"]) for row in engine] == [(step, name) for step, name, _, _ in reference]
    for row, (_, _, ce, mimicry_loss) in zip(engine, reference):
        assert float(row["ce_loss"]) == pytest.approx(ce, abs=1e-5)
        assert float(row["mimicry_loss"]) == pytest.approx(mimicry_loss, abs=1e-5)


def test_sequential_and_simultaneous_updates_differ_after_the_first_student(tmp_path: Path) -> None:
    sequential = trained_rows(cohort(tmp_path, "sequential"))
    simultaneous = trained_rows(cohort(tmp_path, "simultaneous"))
    first_step = [(a, b) for a, b in zip(sequential, simultaneous) if a["step"] == "0"]
    assert first_step[0][0]["mimicry_loss"] == first_step[0][1]["mimicry_loss"]  # the first student sees the same peers
    assert all(a["mimicry_loss"] != b["mimicry_loss"] for a, b in first_step[1:])  # later ones see updated peers


def test_sequential_updates_refuse_external_students() -> None:
    raw = {"students": [{"model": "mlp"}, {"model": "mlp", "name": "far", "external": True}],
           "rpc": {"port": 50151}, "mimicry": {"update": "sequential"}}
    with pytest.raises(ConfigError, match="mimicry.update: sequential runs with Ray and local students only; external students \\(far\\)"):
        parse_config(raw)
