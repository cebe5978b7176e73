"""Config validation: every bad value fails before anything runs, naming the field and what is allowed."""

from pathlib import Path

import pytest
import yaml

from rdml_dist.config import apply_overrides, load_config, parse_config, read_raw_config
from rdml_dist.divergence import DIVERGENCES
from rdml_dist.errors import ConfigError
from rdml_dist.schedules import alpha_at, mimicry_weight_at


def minimal(**sections: object) -> dict:
    raw: dict = {"students": [{"model": "mlp"}, {"model": "small_cnn"}]}
    raw.update(sections)
    return raw


def test_packaged_default_is_valid_and_heterogeneous() -> None:
    config = load_config()
    assert config.data.name == "digits"
    assert config.mimicry.divergence == "renyi" and config.mimicry.alpha == 2.0
    assert len({student.model for student in config.students}) == 3


def test_packaged_cifar_recipe_follows_the_papers() -> None:
    raw = read_raw_config(Path(__file__).parents[2] / "rdml_dist/configs/cifar100_resnet32_wrn28_2.yaml")
    config = parse_config(raw)
    optimizer = config.training.optimizer
    assert (optimizer.name, optimizer.lr, optimizer.nesterov, optimizer.weight_decay) == ("sgd", 0.1, True, 5e-4)
    assert (config.training.batch_size, config.training.epochs) == (128, 200)
    assert [student.model for student in config.students] == ["resnet32", "wrn_28_2"]


@pytest.mark.parametrize(
    "raw,field,fragment",
    [
        (minimal(mimicry={"alpha": -1}), "mimicry.alpha", "greater than or equal to 0"),
        (minimal(mimicry={"temperature": 0}), "mimicry.temperature", "greater than 0"),
        (minimal(mimicry={"divergence": "my module:x"}), "mimicry.divergence", "or look like 'package.module:name'"),
        (minimal(mimicry={"mode": "sequential"}), "mimicry.mode", "'pairwise' or 'ensemble'"),
        (minimal(mimicry={"alpah": 2}), "mimicry.alpah", "unknown field"),
        (minimal(training={"epochs": 0}), "training.epochs", "greater than or equal to 1"),
        ({"students": []}, "students", "at least 1 item"),
        ({}, "students", "required"),
        (minimal(students=[{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "a"}]), "config", "repeated: a"),
        (minimal(students=[{"model": "mlp", "name": "bad name"}]), "students.0.name", "letters, digits"),
        (minimal(mimicry={"alpha": 1, "alpha_schedule": {"kind": "cosine", "floor": 2}}), "mimicry", "must not exceed"),
        (minimal(students=[{"model": "mlp", "resources": {"gpus": 1.5}}]), "students.0.resources.gpus", "below 1"),
        (minimal(students=[{"model": "mlp", "resources": {"cpus": 0}}]), "students.0.resources.cpus", "greater than 0"),
        (minimal(students=[{"model": "mlp", "resources": {"gpu": 1}}]), "students.0.resources.gpu", "unknown field"),
        (minimal(runtime={"ray": {"gpus_per_student": 2.5}}), "runtime.ray.gpus_per_student", "whole number"),
        (minimal(students=[{"model": "mlp", "external": True, "resources": {"cpus": 2}}]), "config", "Ray students only"),
    ],
)
def test_invalid_values_name_the_field(raw: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_model_and_missing_root_fail_in_resource_checks(tmp_path: Path) -> None:
    config_file = tmp_path / "bad_model.yaml"
    config_file.write_text(yaml.safe_dump(minimal(students=[{"model": "resnet33"}])))
    with pytest.raises(ConfigError, match="students.0.model") as caught:
        load_config(config_file)
    assert "resnet32" in str(caught.value)
    missing = tmp_path / "nowhere"
    config_file.write_text(yaml.safe_dump(minimal(data={"name": "cifar10", "root": str(missing)})))
    with pytest.raises(ConfigError, match="data.root") as caught:
        load_config(config_file)
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize(
    "divergence,fragment",
    [
        ("wasserstein", f"unknown divergence 'wasserstein' (registered: {', '.join(DIVERGENCES)};"),
        ("beside_the_config:value", "'beside_the_config:value' is a function, not a rdml_dist.divergence.Divergence"),
        ("beside_the_config:nothing", "module 'beside_the_config' has no attribute 'nothing'"),
    ],
)
def test_a_divergence_that_is_not_one_fails_in_resource_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, divergence: str, fragment: str
) -> None:
    (tmp_path / "beside_the_config.py").write_text("def value(target, input, alpha):\n    return (target - input).sum(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config_file = tmp_path / "bad_divergence.yaml"
    config_file.write_text(yaml.safe_dump(minimal(mimicry={"divergence": divergence})))
    assert parse_config(read_raw_config(config_file)).mimicry.divergence == divergence  # the schema checks the form only
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert caught.value.field == "mimicry.divergence" and fragment in caught.value.problem, caught.value.problem


def test_overrides_parse_yaml_values_and_index_lists() -> None:
    raw = apply_overrides(minimal(), ["mimicry.alpha=0.5", "students.1.model=resnet20", "training.optimizer.nesterov=false"])
    config = parse_config(raw)
    assert config.mimicry.alpha == 0.5
    assert config.students[1].model == "resnet20"
    assert config.training.optimizer.nesterov is False
    with pytest.raises(ConfigError, match="students.5"):
        apply_overrides(minimal(), ["students.5.model=mlp"])
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides(minimal(), ["mimicry.alpha"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("students: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(broken)


def test_default_student_names_and_run_dir() -> None:
    config = parse_config(minimal(name="exp1", students=[{"model": "mlp"}, {"model": "tests.unit.sample_factories:tiny_model"}]))
    assert config.student_names() == ["mlp-0", "tiny_model-1"]
    assert config.resolved_run_dir() == str(Path("~/rdml_results/exp1").expanduser())


def test_alpha_and_weight_schedules() -> None:
    cosine = parse_config(minimal(mimicry={"alpha": 2.0, "alpha_schedule": {"kind": "cosine", "floor": 0.5}})).mimicry
    assert alpha_at(cosine, 0, 10) == pytest.approx(2.0)
    assert alpha_at(cosine, 5, 10) == pytest.approx(1.25)
    assert alpha_at(cosine, 10, 10) == pytest.approx(0.5)
    constant = parse_config(minimal()).mimicry
    assert alpha_at(constant, 7, 10) == constant.alpha
    ramp = parse_config(minimal(mimicry={"weight": 2.0, "burn_in_epochs": 1, "warmup_epochs": 2})).mimicry
    assert [mimicry_weight_at(ramp, epoch) for epoch in (0.5, 1.0, 2.0, 3.0, 9.0)] == [0.0, 0.0, 1.0, 2.0, 2.0]
