"""The sweep file: a base experiment, a search space over its dotted fields, and how to search it.

Read and checked without Ray Tune, so ``rdml-dist validate SWEEP.yaml`` works on a plain install.
"""

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rdml_dist.config import ExperimentConfig, apply_overrides, check_resources, parse_config, read_raw_config
from rdml_dist.errors import ConfigError
from rdml_dist.tune.space import check_domain, extremes

SWEEP_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_SWEEP_STORAGE = "~/rdml_results/sweeps"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SchedulerConfig(_Strict):
    """Early stopping: ``asha`` stops trials behind their rung's best after ``grace_period`` epochs, or ``none``."""

    name: Literal["asha", "none"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the base experiment's training.epochs


class SweepConfig(_Strict):
    """A whole sweep; every trial is the base experiment with the space's values set at their dotted paths."""

    name: str
    base: str | dict[str, Any]  # a path (relative to the sweep file) or an inline experiment
    space: dict[str, Any] = Field(min_length=1)
    metric: str = "ensemble/val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    storage: str = DEFAULT_SWEEP_STORAGE
    address: str | None = None  # the Ray cluster to join (default: start a local one)
    driver_cpus: float = Field(0.5, gt=0)  # bundle 0 of every trial: the trial's own driver
    max_failures: int = Field(1, ge=0)  # Tune retries a trial whose driver died, from its latest checkpoint
    checkpoints_to_keep: int = Field(2, ge=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        if not SWEEP_NAME_PATTERN.match(value):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-' (it names the sweep's directory)")
        return value

    def directory(self) -> Path:
        """``{storage}/{name}``: Tune's state, the trials' directories and runs, the table, best.yaml and plots."""
        return Path(self.storage).expanduser().absolute() / self.name


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep and its base experiment's raw mapping; every problem of the file itself is a ConfigError."""
    file = Path(path)
    raw = read_raw_config(file)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as error:
        problems = [(".".join(str(part) for part in problem["loc"]) or "sweep", str(problem["msg"]).removeprefix("Value error, "))
                    for problem in error.errors()]
        raise ConfigError(*problems[0], more=problems[1:]) from None
    base = read_raw_config(file.parent / sweep.base) if isinstance(sweep.base, str) else dict(sweep.base)
    for parameter, spec in sweep.space.items():
        kind, values = check_domain(parameter, spec)
        if sweep.search == "grid" and kind in ("uniform", "loguniform", "randint"):
            raise ConfigError(f"space.{parameter}", f"search: grid lists every value; {kind} has no list (use grid or choice)")
        if sweep.search == "optuna" and kind == "grid":
            raise ConfigError(f"space.{parameter}", "Optuna samples its own points; use choice instead of grid")
        if sweep.search == "optuna" and kind == "choice" and not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ConfigError(f"space.{parameter}", "Optuna chooses among plain values only (numbers, strings)")
    return sweep, base


def is_sweep_file(path: str | Path) -> bool:
    """A YAML mapping with ``space`` and ``base`` is a sweep, anything else an experiment."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "space" in raw and "base" in raw


def experiment_raw(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base experiment with each parameter's value set at its dotted path (a fresh copy)."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    overrides = [f"{path}={yaml.safe_dump(value, default_flow_style=True)}" for path, value in params.items()]
    return apply_overrides(raw, overrides)


def trial_experiment(base: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The validated experiment of one point of the space (a ConfigError names the first bad field)."""
    config = parse_config(experiment_raw(base, params))
    check_resources(config)
    return config


def validate_sweep(sweep: SweepConfig, base: dict[str, Any]) -> list[str]:
    """Problems of the values the space can produce: every grid/choice value, ranges at their bounds.

    Each parameter's values are tried one at a time on the base experiment (the other
    parameters at their base values), so one problem names the value that causes it.
    """
    problems = []
    try:
        trial_experiment(base, {})
    except ConfigError as error:
        problems.extend(f"base: {field}: {problem}" for field, problem in error.problems)
    for parameter, spec in sweep.space.items():
        kind, values = check_domain(parameter, spec)
        for value in extremes(kind, values):
            try:
                trial_experiment(base, {parameter: value})
            except ConfigError as error:
                shown = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
                problems.extend(f"space.{parameter} = {shown}: {field}: {problem}" for field, problem in error.problems)
    return problems
