"""The one entry point that turns a DataSpec into an in-memory Dataset."""

from dataclasses import replace

from rdml_dist.data.check import check_data_spec
from rdml_dist.data.custom import load_custom
from rdml_dist.data.labels import corrupt_labels
from rdml_dist.data.registry import SOURCES
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset
from rdml_dist.errors import ConfigError
from rdml_dist.factory import is_factory_reference


def load_dataset(spec: DataSpec, seed: int, field: str = "data") -> Dataset:
    """Validate, load, then apply the ``augment`` override and label corruption to TRAIN only.

    Every student calls this itself; all randomness comes from ``seed``, so the cohort holds
    identical data without shipping it around.
    """
    check_data_spec(spec, field)
    load = load_custom if is_factory_reference(spec.name) else SOURCES[spec.name].load
    dataset = load(spec, seed, field)
    train = dataset.train if spec.augment is None else replace(dataset.train, augment=spec.augment)
    if spec.label_noise and dataset.num_classes < 2:
        raise ConfigError(f"{field}.label_noise", f"needs at least 2 classes, {spec.name} has {dataset.num_classes}")
    if spec.label_noise or spec.unlabeled_fraction:
        train = corrupt_labels(train, dataset.num_classes, spec.label_noise, spec.unlabeled_fraction, seed)
    return replace(dataset, train=train)
