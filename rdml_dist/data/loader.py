"""The one entry point that turns a DataSpec into a Dataset."""

from dataclasses import replace

from rdml_dist.data.check import check_data_spec
from rdml_dist.data.custom import load_custom
from rdml_dist.data.labels import corrupt_labels
from rdml_dist.data.registry import SOURCES
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, Split, TensorSplit
from rdml_dist.errors import ConfigError
from rdml_dist.factory import is_factory_reference, load_factory


def _with_augmentation(train: Split, dataset: Dataset, spec: DataSpec, field: str) -> Split:
    """``data.augment`` overrides the set's default; ``data.transform`` installs the batch hook."""
    if spec.augment is not None and isinstance(train, TensorSplit):
        if spec.augment and not dataset.is_image:
            raise ConfigError(
                f"{field}.augment",
                f"the built-in crop and flip need images (C, H, W); {dataset.name} gives "
                f"{dataset.input_dtype} inputs of shape {dataset.input_shape} (use data.transform instead)",
            )
        train = replace(train, augment=spec.augment)
    if spec.transform is not None:
        train = replace(train, transform=load_factory(spec.transform, f"{field}.transform"))
    return train


def load_dataset(spec: DataSpec, seed: int, field: str = "data") -> Dataset:
    """Validate, load, then apply augmentation settings and label corruption to TRAIN only.

    Every student calls this itself; all randomness comes from ``seed``, so the cohort holds
    identical data without shipping it around.
    """
    check_data_spec(spec, field)
    load = load_custom if is_factory_reference(spec.name) else SOURCES[spec.name].load
    dataset = load(spec, seed, field)
    train = _with_augmentation(dataset.train, dataset, spec, field)
    if spec.label_noise and dataset.num_classes < 2:
        raise ConfigError(f"{field}.label_noise", f"needs at least 2 classes, {spec.name} has {dataset.num_classes}")
    if spec.label_noise or spec.unlabeled_fraction:
        train = corrupt_labels(train, dataset.num_classes, spec.label_noise, spec.unlabeled_fraction, seed)
    return replace(dataset, train=train)
