"""User errors are one line per problem, all at once, naming the field; user modules import from beside the config."""

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import rdml_dist
from rdml_dist.cli import main
from rdml_dist.config import load_config
from rdml_dist.errors import ConfigError


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI extends sys.path and PYTHONPATH: give each test its own copies."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_every_problem_of_a_config_is_reported_on_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", "--set", "mimicry.alpha=-1", "--set", "training.epochs=0", "--set", "seeed=3"])
    assert code == 2
    lines = _errors(capsys)
    assert len(lines) == 3
    assert lines[0].startswith("rdml-dist: invalid config: training.epochs: ")
    assert lines[1].startswith("rdml-dist: invalid config: mimicry.alpha: ")
    assert lines[2].startswith("rdml-dist: invalid config: seeed: unknown field")


def test_model_and_data_problems_are_reported_together_naming_each_field(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", "--set", "students.0.options.width=3", "--set", "students.0.options.depth=2",
                 "--set", "students.1.model=resnet33", "--set", "data.name=cifar100"])
    assert code == 2
    fields = [line.removeprefix("rdml-dist: invalid config: ").split(": ")[0] for line in _errors(capsys)]
    assert fields == ["students.0.options.width", "students.0.options.depth", "students.1.model", "data.root"]


def test_schema_and_model_problems_are_reported_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--set", "mimicry.alpha=-1", "--set", "students.1.model=resnet33"]) == 2
    fields = [line.removeprefix("rdml-dist: invalid config: ").split(": ")[0] for line in _errors(capsys)]
    assert fields == ["mimicry.alpha", "students.1.model"]


def test_a_config_error_keeps_all_its_problems_through_pickling() -> None:
    import pickle

    error = ConfigError("a.b", "bad", more=[("c", "worse")])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == [("a.b", "bad"), ("c", "worse")] and str(copy) == "a.b: bad\nc: worse"


def _write_factory_beside(directory: Path, module: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(textwrap.dedent("""
        from torch import nn

        def build(num_classes, in_channels, image_size, width=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, width), nn.ReLU(),
                                 nn.Linear(width, num_classes))
    """))
    config = directory / "cohort.yaml"
    config.write_text(yaml.safe_dump({"students": [{"model": f"{module}:build", "options": {"width": 8}}, {"model": "mlp"}]}))
    return config


def test_modules_beside_the_config_import_in_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], isolated_imports: None) -> None:
    config = _write_factory_beside(tmp_path / "experiment", "beside_config_models")
    monkeypatch.chdir(tmp_path)  # elsewhere: only the config's directory holds the module
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err
    assert str(config.parent) in os.environ["PYTHONPATH"].split(os.pathsep)  # local Ray students inherit it


def test_modules_in_the_working_directory_import_in_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], isolated_imports: None) -> None:
    config = _write_factory_beside(tmp_path / "work", "working_directory_models")
    moved = tmp_path / "configs" / "cohort.yaml"
    moved.parent.mkdir()
    config.rename(moved)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["validate", str(moved)]) == 0, capsys.readouterr().err


def test_without_the_cli_a_module_that_is_nowhere_is_named(tmp_path: Path) -> None:
    config = tmp_path / "cohort.yaml"
    config.write_text(yaml.safe_dump({"students": [{"model": "nowhere_to_be_found:build"}]}))
    with pytest.raises(ConfigError, match="students.0.model: cannot import module 'nowhere_to_be_found'"):
        load_config(config)


def test_top_level_names_do_not_shadow_the_package_modules() -> None:
    package = Path(rdml_dist.__file__).parent
    modules = [path.stem for path in package.glob("*.py") if path.stem != "__init__"]
    modules += [path.name for path in package.iterdir() if (path / "__init__.py").exists()]
    for name in modules:
        module = importlib.import_module(f"rdml_dist.{name}")
        assert getattr(rdml_dist, name, module) is module, name
    from rdml_dist import divergence

    assert divergence.__name__ == "rdml_dist.divergence"
