"""scikit-learn's bundled 8x8 digits: the data set that needs no files and no network.

The file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) is read as its own
``load_digits`` reads it, without importing scikit-learn, which costs every student process
about a second; where the file is not found, scikit-learn's loader reads it.
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from rdml_dist.data.holdout import stratified_holdout
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, channel_stats, make_split


def load_digits(spec: DataSpec, seed: int, field: str) -> Dataset:
    """1,797 grey 1x8x8 images (values 0..16, scaled to [0, 1]), split by ``val_fraction``."""
    images, labels = _digits_arrays()
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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 flattened images (float64, 0..16) and their labels, as ``load_digits(return_X_y=True)`` gives them."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(locations)), "datasets", "data", "digits.csv.gz") if locations else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sklearn_digits

        return sklearn_digits(return_X_y=True)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int, copy=False)
