"""Reading an experiment: the YAML file (or the packaged default), ``--set`` overrides, validation into the schema.

Every problem is reported as a :class:`~rdml_dist.errors.ConfigError` naming the dotted field
(``mimicry.alpha``, ``students.1.model``) and what is allowed, so a bad file never reaches a cluster.
"""

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rdml_dist.config.schema import ExperimentConfig
from rdml_dist.errors import ConfigError

DEFAULT_CONFIG_NAME = "digits_renyi.yaml"


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "config"


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; every field is listed in docs/configuration.md)"
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def parse_config(raw: Any) -> ExperimentConfig:
    """Validate a mapping into an :class:`ExperimentConfig` (types and ranges only, no file system)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"must be a mapping at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        problems = [(_field_path(problem["loc"]), _describe(problem)) for problem in error.errors()]
        raise ConfigError(*problems[0], more=problems[1:]) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML; list items by index) to a raw mapping."""
    for override in overrides:
        path, separator, text = override.partition("=")
        if not separator or not path:
            raise ConfigError("--set", f"{override!r} must look like key.path=value")
        value = yaml.safe_load(text)
        node: Any = raw
        parts = path.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]))
        _assign(node, parts[-1], value, path)
    return raw


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        index = _list_index(node, key, path)
        return node[index]
    if not isinstance(node, dict):
        raise ConfigError(path, "cannot descend into a non-mapping value")
    return node.setdefault(key, {})


def _assign(node: Any, key: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, key, path)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(path, "cannot set a field inside a non-mapping value")


def _list_index(node: list[Any], key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(path, f"list index must be 0..{len(node) - 1}, got {key!r}")
    return int(key)


def read_raw_config(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping of ``path``, or of the packaged default experiment when ``path`` is None."""
    if path is None:
        text = resources.files("rdml_dist.configs").joinpath(DEFAULT_CONFIG_NAME).read_text()
        source = f"packaged {DEFAULT_CONFIG_NAME}"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError("config", f"file not found: {file}")
        text, source = file.read_text(), str(file)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("config", f"{source} is not valid YAML ({error})") from None
    return raw if raw is not None else {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override, validate and check an experiment: the one entry point used before launching."""
    from rdml_dist.config.checks import check_resources, model_problems

    raw = apply_overrides(read_raw_config(path), overrides or [])
    try:
        config = parse_config(raw)
    except ConfigError as invalid:  # report the models' problems too, all at once
        students = raw.get("students") if isinstance(raw, dict) else None
        entries = [(entry.get("model"), entry.get("options", {})) if isinstance(entry, dict) else (None, None)
                   for entry in students] if isinstance(students, list) else []
        raise ConfigError.combine([invalid, *model_problems(entries)]) from None
    check_resources(config)
    return config
