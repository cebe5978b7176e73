"""Model registry: the names a cohort config may give a student, plus user factories.

A student's ``model`` is either a registry name (``MODEL_NAMES``) or ``package.module:function``;
``check_model_name`` validates one before anything is launched and ``build_model`` constructs it.
"""

import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from rdml_dist.errors import ConfigError
from rdml_dist.factory import call_with_accepted, is_factory_reference, load_factory
from rdml_dist.models.resnet_cifar import CifarResNet
from rdml_dist.models.simple import MLP, SmallCNN
from rdml_dist.models.torchvision_adapted import cifar_mobilenetv2, cifar_resnet18
from rdml_dist.models.wide_resnet import WideResNet

__all__ = ["MODEL_NAMES", "CifarResNet", "WideResNet", "build_model", "check_model_name"]

# Values the cohort config supplies to every model; options may not override them.
CONTEXT_ARGUMENTS = ("num_classes", "input_shape", "input_dtype", "in_channels", "image_size")
FEATURE_MODELS = frozenset({"mlp"})  # registry models that take float inputs of any shape; the rest take images

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "resnet20": partial(CifarResNet, depth=20),
    "resnet32": partial(CifarResNet, depth=32),
    "resnet56": partial(CifarResNet, depth=56),
    "wrn_16_2": partial(WideResNet, depth=16, widen_factor=2),
    "wrn_28_2": partial(WideResNet, depth=28, widen_factor=2),
    "wrn_28_4": partial(WideResNet, depth=28, widen_factor=4),
    "wrn_28_10": partial(WideResNet, depth=28, widen_factor=10),
    "wrn_40_2": partial(WideResNet, depth=40, widen_factor=2),
    "resnet18": cifar_resnet18,
    "mobilenetv2": cifar_mobilenetv2,
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def _constructor(name: str, field: str) -> Callable[..., Any]:
    """The registry constructor or imported user factory that ``name`` refers to."""
    if is_factory_reference(name):
        return load_factory(name, field)
    if name not in _REGISTRY:
        allowed = ", ".join(MODEL_NAMES)
        raise ConfigError(field, f"unknown model {name!r} (allowed: {allowed} or package.module:function)")
    return _REGISTRY[name]


def _option_names(constructor: Callable[..., Any]) -> set[str] | None:
    """Keyword options ``constructor`` takes, or None when it takes ``**kwargs`` or has no signature.

    Arguments a registry ``partial`` already fixes (a ResNet's depth) are not options.
    """
    try:
        parameters = inspect.signature(constructor).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    fixed = getattr(constructor, "keywords", {})
    return {
        name
        for name, p in parameters.items()
        if p.kind is not inspect.Parameter.VAR_POSITIONAL and name not in fixed and name not in CONTEXT_ARGUMENTS
    }


def _check_options(name: str, constructor: Callable[..., Any], options: Mapping[str, Any], field: str) -> None:
    """Reject option keywords the model does not take, before constructing anything; each named ``<options>.<key>``.

    ``field`` names the model (``students.1.model``); the options sit beside it (``students.1.options``).
    """
    options_field = f"{field.removesuffix('.model')}.options" if field.endswith(".model") else f"{field}.options"
    accepted = _option_names(constructor)
    problems = []
    for key in options:
        if key in CONTEXT_ARGUMENTS:
            problems.append((f"{options_field}.{key}", f"option {key!r} of model {name!r} is set by the cohort config, not by options"))
        elif accepted is not None and key not in accepted:
            allowed = ", ".join(sorted(accepted)) or "none"
            problems.append((f"{options_field}.{key}", f"unknown option {key!r} for model {name!r} (allowed: {allowed})"))
    if problems:
        raise ConfigError(*problems[0], more=problems[1:])


def check_model_name(name: str, field: str, options: Mapping[str, Any] | None = None) -> None:
    """Validate a model reference without building it: a registry name, or a factory that imports and is callable.

    With ``options``, also check that the model takes those keywords.
    """
    constructor = _constructor(name, field)
    if options:
        _check_options(name, constructor, options, field)


def _check_inputs(name: str, input_shape: tuple[int, ...], input_dtype: torch.dtype, field: str) -> None:
    """A registry model gets inputs it can read: images for the convolutional ones, floats for the MLP."""
    if is_factory_reference(name):
        return
    given = f"the data give {input_dtype} inputs of shape {input_shape}"
    if name not in FEATURE_MODELS and len(input_shape) != 3:
        raise ConfigError(field, f"{name!r} is an image model and needs (C, H, W) inputs; {given} (use mlp or a package.module:function model)")
    if not input_dtype.is_floating_point:
        raise ConfigError(field, f"{name!r} needs floating-point inputs; {given} (use a package.module:function model, e.g. with an embedding)")


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    input_dtype: torch.dtype = torch.float32,
    options: dict[str, Any] | None = None,
    field: str = "model",
) -> nn.Module:
    """Construct model ``name`` returning raw logits of shape ``(batch, num_classes)``.

    ``options`` are keyword arguments of the registry model or user factory; a factory is also
    given whichever of ``num_classes``, ``input_shape`` (one sample, as the model receives it),
    ``input_dtype``, and for images ``in_channels`` and ``image_size`` (square images; None
    otherwise) its signature accepts. Seed with ``torch.manual_seed`` first for reproducible
    initial weights.
    """
    options = dict(options or {})
    constructor = _constructor(name, field)
    _check_options(name, constructor, options, field)
    _check_inputs(name, input_shape, input_dtype, field)
    is_image = len(input_shape) == 3
    context = {
        "num_classes": num_classes,
        "input_shape": input_shape,
        "input_dtype": input_dtype,
        "in_channels": input_shape[0] if is_image else None,
        "image_size": input_shape[1] if is_image and input_shape[1] == input_shape[2] else None,
    }
    try:
        model = call_with_accepted(constructor, context, options)
    except (TypeError, ValueError) as error:
        raise ConfigError(field, f"cannot build model {name!r} with options {options!r}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(field, f"{name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
