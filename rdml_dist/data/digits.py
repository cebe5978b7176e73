"""scikit-learn's bundled 8x8 digits: the data set that needs no files and no network."""

import torch
from sklearn.datasets import load_digits as sklearn_digits

from rdml_dist.data.holdout import stratified_holdout
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, channel_stats, make_split


def load_digits(spec: DataSpec, seed: int, field: str) -> Dataset:
    """1,797 grey 1x8x8 images (values 0..16, scaled to [0, 1]), split by ``val_fraction``."""
    images, labels = sklearn_digits(return_X_y=True)
    pixels = torch.from_numpy(images).float().div(16.0).view(-1, 1, 8, 8)
    labels = torch.from_numpy(labels).to(torch.int64)
    train, val = stratified_holdout(labels, spec.val_fraction, seed, field)
    stats = channel_stats(pixels[train])
    return Dataset(
        train=make_split(pixels[train], labels[train], stats),
        val=make_split(pixels[val], labels[val], stats),
        num_classes=10,
        input_shape=(1, 8, 8),
        input_dtype=torch.float32,
        name="digits",
    )
