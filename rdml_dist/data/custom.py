"""User data sets from a ``package.module:function`` factory.

Contract: the factory is called with ``data.options`` as keyword arguments, plus ``seed`` and
``root`` when its signature takes them, and returns either

* a ``rdml_dist.data.Dataset`` (full control: normalization, augmentation default, names), or
* a ``(train, val)`` pair. Each part is

  - an ``(inputs, labels)`` pair of tensors or a ``torch.utils.data.TensorDataset`` of those
    two, held in memory: inputs ``(N, ...)`` of any shape and dtype (int64 token ids, float
    features, ``(N, C, H, W)`` images: uint8 ones are scaled to [0, 1] and normalized with the
    training split's per-channel statistics, float ones used as is); or
  - any other map-style ``torch.utils.data.Dataset`` whose items are ``(input tensor, label)``
    and which exposes its labels as ``targets``: read through DataLoader workers, for data
    larger than memory; its own transforms run per item, seeded alike in every student.

  Labels are integers in 0..K-1, where K = the largest label + 1.

Label noise, hidden labels, ``data.augment`` and ``data.transform`` apply to either form afterwards.
"""

from typing import Any

import torch
from torch.utils.data import Dataset as MapDataset

from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, Split, TensorSplit, channel_stats, is_image_batch, make_split, model_input
from rdml_dist.data.streamed import StreamedSplit, item_input
from rdml_dist.errors import ConfigError
from rdml_dist.factory import call_with_accepted, load_factory

CONTRACT = (
    "a data factory must return a rdml_dist.data.Dataset or a (train, val) pair, each an "
    "(inputs (N, ...), labels (N,)) pair of tensors, a TensorDataset, or a map-style Dataset "
    "of (input tensor, label) items with .targets"
)


def _violation(field: str, name: str, problem: str) -> ConfigError:
    return ConfigError(f"{field}.name", f"factory {name}: {problem}; {CONTRACT}")


def _checked_labels(labels: Any, which: str, name: str, field: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or len(labels) == 0:
        raise _violation(field, name, f"{which} labels are {labels.dtype} of shape {tuple(labels.shape)}")
    return labels.to(torch.int64)


def _tensor_pair(part: Any, which: str, name: str, field: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) of an in-memory part, or None when ``part`` is a map-style dataset to stream."""
    tensors = getattr(part, "tensors", part)  # a TensorDataset keeps its tensors here
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2 and all(isinstance(t, torch.Tensor) for t in tensors):
        inputs, labels = tensors
        labels = _checked_labels(labels, which, name, field)
        if inputs.dim() < 1 or len(inputs) != len(labels):
            raise _violation(field, name, f"{which} inputs have shape {tuple(inputs.shape)} for {len(labels)} labels")
        return inputs, labels
    if isinstance(part, MapDataset) and hasattr(part, "__len__"):
        return None
    raise _violation(field, name, f"the {which} split is a {type(part).__name__}")


def _streamed(part: MapDataset, which: str, spec: DataSpec, name: str, field: str) -> StreamedSplit:
    """A map-style part, checked on its first item before any worker starts."""
    if not hasattr(part, "targets"):
        raise _violation(field, name, f"the {which} split ({type(part).__name__}) has no .targets holding its labels")
    labels = _checked_labels(part.targets, which, name, field)
    if len(labels) != len(part):  # type: ignore[arg-type]
        raise _violation(field, name, f"the {which} split has {len(part)} items but {len(labels)} targets")  # type: ignore[arg-type]
    first = item_input(part[0])
    if not isinstance(first, torch.Tensor):
        raise _violation(field, name, f"{which} items hold a {type(first).__name__}, not a tensor (add a ToTensor transform)")
    return StreamedSplit(items=part, labels=labels, clean_labels=labels, workers=spec.workers)


def _from_pair(result: Any, spec: DataSpec, name: str, field: str) -> Dataset:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise _violation(field, name, f"it returned a {type(result).__name__}")
    pairs = [_tensor_pair(part, which, name, field) for part, which in zip(result, ("train", "val"))]
    images = [pair[0] for pair in pairs if pair is not None and is_image_batch(pair[0]) and pair[0].dtype == torch.uint8]
    stats = channel_stats(images[0]) if images else None
    splits: list[Split] = [
        make_split(*pair, stats if pair[0].dtype == torch.uint8 else None)
        if pair is not None
        else _streamed(part, which, spec, name, field)
        for pair, part, which in zip(pairs, result, ("train", "val"))
    ]
    train, val = splits
    input_shape, input_dtype = model_input(train)
    return Dataset(
        train=train,
        val=val,
        num_classes=int(max(train.labels.max(), val.labels.max())) + 1,
        input_shape=input_shape,
        input_dtype=input_dtype,
        name=name,
    )


def _check_split(split: Split, which: str, dataset: Dataset, name: str, field: str) -> None:
    if len(split) == 0 or len(split.clean_labels) != len(split):
        raise _violation(field, name, f"the {which} split is empty or its labels and clean labels differ in length")
    shape, dtype = model_input(split)
    if (shape, dtype) != (dataset.input_shape, dataset.input_dtype):
        raise _violation(field, name, f"{which} inputs are {dtype} of shape {shape}, the training inputs {dataset.input_dtype} of shape {dataset.input_shape}")
    if isinstance(split, TensorSplit) and split.mean is not None and split.std is not None:
        if not dataset.is_image or len(split.mean) != dataset.input_shape[0] or len(split.std) != dataset.input_shape[0]:
            raise _violation(field, name, f"{which} mean/std do not have {dataset.in_channels} channels")
    clean, labels, classes = split.clean_labels, split.labels, dataset.num_classes
    if clean.min() < 0 or clean.max() >= classes or labels.min() < -1 or labels.max() >= classes:
        raise _violation(field, name, f"{which} labels fall outside 0..{dataset.num_classes - 1}")


def load_custom(spec: DataSpec, seed: int, field: str) -> Dataset:
    """Call the factory named by ``spec.name`` and hold its result to the contract above."""
    factory = load_factory(spec.name, f"{field}.name")
    result = call_with_accepted(factory, {"seed": seed, "root": spec.root}, dict(spec.options))
    dataset = result if isinstance(result, Dataset) else _from_pair(result, spec, spec.name, field)
    _check_split(dataset.train, "train", dataset, spec.name, field)
    _check_split(dataset.val, "val", dataset, spec.name, field)
    return dataset
