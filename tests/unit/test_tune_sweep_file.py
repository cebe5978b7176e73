"""Sweep files without Ray Tune: the schema, dotted paths, `rdml-dist validate SWEEP.yaml`, and the missing extra."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rdml_dist.cli import main
from rdml_dist.errors import ConfigError
from rdml_dist.tune.results import TrialOutcome, write_best
from rdml_dist.tune.space import extremes
from rdml_dist.tune.sweep import experiment_raw, load_sweep

REPOSITORY = Path(__file__).resolve().parents[2]
BASE = {"name": "b", "data": {"name": "digits"}, "students": [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}]}


def write_sweep(directory: Path, space: dict[str, Any], **settings: Any) -> Path:
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": BASE, "space": space, **settings}))
    return path


def test_values_land_at_their_dotted_paths_on_a_copy() -> None:
    students = [{"name": "a", "model": "mlp"}]
    raw = experiment_raw(BASE, {"mimicry.alpha": 1.0e-5, "mimicry.divergence": "kl", "students": students, "students.0.name": "z"})
    assert raw["mimicry"] == {"alpha": 1.0e-5, "divergence": "kl"}  # a small float stays a float
    assert raw["students"] == [{"name": "z", "model": "mlp"}]
    assert BASE["students"][0]["name"] == "mlp" and "mimicry" not in BASE


def test_base_is_read_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", "space": {"seed": {"grid": [0, 1]}}}))
    sweep, base = load_sweep(tmp_path / "sweep.yaml")
    assert base == BASE and sweep.metric == "ensemble/val_accuracy" and sweep.mode == "max"


@pytest.mark.parametrize("space,settings,field", [
    ({"mimicry.alpha": {"uniform": [5, 0.5]}}, {}, "space.mimicry.alpha"),
    ({"mimicry.alpha": {"loguniform": [0, 1]}}, {}, "space.mimicry.alpha"),
    ({"mimicry.alpha": {"normal": [0, 1]}}, {}, "space.mimicry.alpha"),
    ({"mimicry.alpha": {"uniform": [0.5, 5]}}, {"search": "grid"}, "space.mimicry.alpha"),
    ({"seed": {"grid": [0, 1]}}, {"search": "optuna"}, "space.seed"),
    ({"seed": {"grid": [0, 1]}}, {"scheduler": {"name": "hyperband"}}, "scheduler.name"),
])
def test_a_bad_sweep_file_names_its_field(tmp_path: Path, space: dict[str, Any], settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_sweep(write_sweep(tmp_path, space, **settings))
    assert raised.value.field == field


def test_ranges_are_checked_at_their_bounds() -> None:
    assert extremes("randint", [1, 5]) == [1, 4] and extremes("uniform", [0.5, 5]) == [0.5, 5]


def test_validate_checks_every_value_the_space_can_produce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, {
        "mimicry.alpha": {"choice": [2.0, -1.0]},
        "mimicry.temperature": {"uniform": [0.0, 2.0]},
        "students": {"choice": [[{"model": "mlp"}], [{"model": "resnet33"}]]},
        "seed": {"grid": [0, 1]},
    })
    assert main(["validate", str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3, errors
    assert errors[0].startswith("rdml-dist: invalid sweep value: space.mimicry.alpha = -1.0: mimicry.alpha:")
    assert errors[1].startswith("rdml-dist: invalid sweep value: space.mimicry.temperature = 0.0: mimicry.temperature:")
    assert "students.0.model" in errors[2] and "resnet33" in errors[2]


def test_validate_accepts_the_example_sweeps(capsys: pytest.CaptureFixture[str]) -> None:
    for path in sorted((REPOSITORY / "examples" / "sweeps").glob("*.yaml")):
        if "space" in yaml.safe_load(path.read_text()):
            assert main(["validate", str(path)]) == 0, capsys.readouterr().err
            assert "valid sweep" in capsys.readouterr().out


def test_tune_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    program = ("import sys; sys.modules['ray.tune'] = None; from rdml_dist.cli import main; "
               f"sys.exit(main(['tune', {str(write_sweep(tmp_path, {'seed': {'grid': [0]}}))!r}]))")
    finished = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        'rdml-dist: tune needs Ray Tune, which is not installed: pip install "rdml-dist[tune]" (or "ray[tune]==2.60.*")']


def test_best_yaml_is_the_best_trials_experiment_without_the_token(tmp_path: Path) -> None:
    """best.yaml is written for people to train again, so a cohort token in the sweep's base never lands in it."""
    secret = "s3cret-cohort-token"
    sweep, base = load_sweep(write_sweep(tmp_path, {"mimicry.alpha": {"grid": [1.5, 2.0]}}))
    base = {**base, "rpc": {"token": secret}}
    rows = [TrialOutcome("t2", {"mimicry.alpha": 2.0}, "completed", 2, 0.95, 0.95),  # ranked, the best first
            TrialOutcome("t1", {"mimicry.alpha": 1.5}, "completed", 2, 0.91, 0.92)]
    path = write_best(rows, sweep, base, tmp_path)
    assert path is not None and secret not in path.read_text()
    best = yaml.safe_load(path.read_text())
    assert best["mimicry"]["alpha"] == 2.0 and best["rpc"]["token"] is None
