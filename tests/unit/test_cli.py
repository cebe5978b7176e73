"""The command line: validation messages, overrides, and a short local training run."""

import json
import re
from pathlib import Path

import pytest

from rdml_dist.cli import main


@pytest.mark.parametrize(
    "override,field",
    [
        ("students.0.model=resnet33", "students.0.model"),
        ("mimicry.alpha=-0.5", "mimicry.alpha"),
        ("mimicry.temperature=0", "mimicry.temperature"),
        ("data.name=cifar100", "data.root"),
        ("students.0.options.width=3", "students.0.options.width"),
    ],
)
def test_bad_config_fails_with_one_line_before_training(
    override: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "--engine", "local", "--run-dir", str(run_dir), "--set", override])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rdml-dist: invalid config: {field}:")
    assert not run_dir.exists()


def test_validate_reports_the_cohort(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    assert "valid (3 students: mlp, cnn, resnet20; renyi, alpha=2.0" in capsys.readouterr().out


def test_train_default_locally_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    overrides = ["--set", "training.epochs=1", "--set", "students.2.model=mlp", "--set", "runtime.torch_threads=1"]
    assert main(["train", "--engine", "local", "--no-progress", "--run-dir", str(run_dir), *overrides]) == 0
    captured = capsys.readouterr()
    out = captured.out
    log_line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} rdml-dist INFO metrics at http://127\.0\.0\.1:\d+/metrics$"
    assert re.search(log_line, captured.err, re.MULTILINE), captured.err  # events are log records in one format
    assert "rdml-dist INFO" not in out  # the result table stays plain output
    assert "ensemble" in out and "final acc" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["engine"] == "local" and len(results["epochs"]) == 1
    final = run_dir / "checkpoints" / "step-00000023"  # one epoch of ceil(1437 / 64) steps
    assert {path.name for path in final.iterdir()} == {"mlp.pt", "cnn.pt", "resnet20.pt", "manifest.json"}
    assert json.loads((final / "manifest.json").read_text())["step"] == 23
