"""A sweep's search space: one ``{kind: values}`` per dotted config path, as Ray Tune domains.

Kinds: ``uniform: [low, high]``, ``loguniform: [low, high]``, ``randint: [low, high)``,
``choice: [a, b, ...]`` (sampled) and ``grid: [a, b, ...]`` (every value, crossed with the other grids).
"""

from typing import Any

from rdml_dist.errors import ConfigError

RANGES = ("uniform", "loguniform", "randint")
LISTS = ("choice", "grid")
KINDS = RANGES + LISTS


def check_domain(path: str, spec: Any) -> tuple[str, list[Any]]:
    """``(kind, values)`` of one parameter, or a ConfigError naming ``space.<path>`` and what is wrong."""
    field = f"space.{path}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(field, f"must be one of {{kind: values}} with kind in {', '.join(KINDS)}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(field, f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(field, f"{kind} needs a non-empty list of values, got {values!r}")
    if kind in RANGES:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(field, f"{kind} needs [low, high] numbers, got {values!r}")
        low, high = values
        if low >= high:
            raise ConfigError(field, f"{kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(field, f"loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(field, f"randint needs whole numbers [low, high), got {values!r}")
    return kind, values


def extremes(kind: str, values: list[Any]) -> list[Any]:
    """Every value a parameter can produce where they can be listed, else its bounds (``randint``'s high is excluded)."""
    if kind == "randint":
        return [values[0], values[1] - 1]
    return list(values)


def tune_domain(kind: str, values: list[Any]) -> Any:
    """The Ray Tune domain of one parameter (imports Ray Tune)."""
    from ray import tune

    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)
