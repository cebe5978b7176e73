"""Resolve user-supplied ``package.module:name`` references: factories for models and data sets, divergences."""

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from rdml_dist.errors import ConfigError


def is_factory_reference(name: str) -> bool:
    """True when ``name`` looks like ``package.module:function`` rather than a registry name."""
    return ":" in name


def load_reference(reference: str, field: str) -> Any:
    """Import ``package.module:attribute`` and return the attribute, or raise ConfigError naming ``field``."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(field, f"reference {reference!r} must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(field, f"cannot import module {module_name!r} ({error})") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(field, f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def load_factory(reference: str, field: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable, or raise ConfigError naming ``field``."""
    target = load_reference(reference, field)
    if not callable(target):
        raise ConfigError(field, f"{reference!r} is not callable")
    return target


def call_with_accepted(function: Callable[..., Any], offered: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """Call ``function(**kwargs)`` plus those ``offered`` arguments its signature accepts.

    Lets a user factory take ``num_classes`` (say) without being forced to accept every
    context value we could pass.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function(**kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {k: v for k, v in offered.items() if k not in kwargs and (takes_any or k in parameters)}
    return function(**extra, **kwargs)
