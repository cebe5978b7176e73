"""User data sets from a ``package.module:function`` factory.

Contract: the factory is called with ``data.options`` as keyword arguments, plus ``seed`` and
``root`` when its signature takes them, and returns either

* a ``rdml_dist.data.Dataset`` (full control: normalization, augmentation default, names), or
* a ``(train, val)`` pair, each an ``(images, labels)`` pair of tensors or a
  ``torch.utils.data.TensorDataset`` of those two: images (N, C, H, H), uint8 (scaled to
  [0, 1] and normalized with the training split's per-channel statistics) or float (used as
  is); labels (N,) integers in 0..K-1, where K = the largest label + 1.

Label noise, hidden labels and ``data.augment`` apply to either form afterwards.
"""

from typing import Any

import torch

from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, Split, channel_stats, make_split
from rdml_dist.errors import ConfigError
from rdml_dist.factory import call_with_accepted, load_factory

CONTRACT = (
    "a data factory must return a rdml_dist.data.Dataset or a (train, val) pair, each an "
    "(images (N, C, H, H), labels (N,)) pair of tensors or a TensorDataset"
)


def _violation(field: str, name: str, problem: str) -> ConfigError:
    return ConfigError(f"{field}.name", f"factory {name}: {problem}; {CONTRACT}")


def _tensors(part: Any, which: str, name: str, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, labels) of one returned split, with shapes and dtypes checked."""
    tensors = getattr(part, "tensors", part)  # a TensorDataset keeps its tensors here
    if not (isinstance(tensors, (tuple, list)) and len(tensors) == 2 and all(isinstance(t, torch.Tensor) for t in tensors)):
        raise _violation(field, name, f"the {which} split is a {type(part).__name__}")
    images, labels = tensors
    if images.dim() != 4 or images.shape[2] != images.shape[3] or len(images) == 0:
        raise _violation(field, name, f"{which} images have shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise _violation(field, name, f"{which} labels are {labels.dtype} of shape {tuple(labels.shape)}")
    return images, labels.to(torch.int64)


def _from_pair(result: Any, name: str, field: str) -> Dataset:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise _violation(field, name, f"it returned a {type(result).__name__}")
    (train_images, train_labels), (val_images, val_labels) = (
        _tensors(part, which, name, field) for part, which in zip(result, ("train", "val"))
    )
    channels = train_images.shape[1]
    if train_images.dtype == torch.uint8:
        stats = channel_stats(train_images)
    else:
        stats = ((0.0,) * channels, (1.0,) * channels)
    return Dataset(
        train=make_split(train_images, train_labels, stats),
        val=make_split(val_images, val_labels, stats),
        num_classes=int(max(train_labels.max(), val_labels.max())) + 1,
        in_channels=channels,
        image_size=train_images.shape[2],
        name=name,
    )


def _check_split(split: Split, which: str, dataset: Dataset, name: str, field: str) -> None:
    expected = (len(split.labels), dataset.in_channels, dataset.image_size, dataset.image_size)
    if len(split) == 0 or tuple(split.pixels.shape) != expected or len(split.clean_labels) != len(split):
        raise _violation(field, name, f"{which} images have shape {tuple(split.pixels.shape)}, expected {expected}")
    if len(split.mean) != dataset.in_channels or len(split.std) != dataset.in_channels:
        raise _violation(field, name, f"{which} mean/std do not have {dataset.in_channels} channels")
    clean, labels, classes = split.clean_labels, split.labels, dataset.num_classes
    if clean.min() < 0 or clean.max() >= classes or labels.min() < -1 or labels.max() >= classes:
        raise _violation(field, name, f"{which} labels fall outside 0..{dataset.num_classes - 1}")


def load_custom(spec: DataSpec, seed: int, field: str) -> Dataset:
    """Call the factory named by ``spec.name`` and hold its result to the contract above."""
    factory = load_factory(spec.name, f"{field}.name")
    result = call_with_accepted(factory, {"seed": seed, "root": spec.root}, dict(spec.options))
    dataset = result if isinstance(result, Dataset) else _from_pair(result, spec.name, field)
    _check_split(dataset.train, "train", dataset, spec.name, field)
    _check_split(dataset.val, "val", dataset, spec.name, field)
    return dataset
