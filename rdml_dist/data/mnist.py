"""MNIST and Fashion-MNIST through torchvision, which reads the raw idx files without md5 checks."""

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, make_split

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class MnistLayout:
    """One MNIST-format variant: its torchvision class (which names the folder; imported when it reads) and constants."""

    name: str
    reader: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


MNIST = MnistLayout(name="mnist", reader="MNIST", mean=(0.1307,), std=(0.3081,))
FASHION_MNIST = MnistLayout(name="fashion_mnist", reader="FashionMNIST", mean=(0.2860,), std=(0.3530,))


def mnist_files(layout: MnistLayout, root: Path) -> list[Path]:
    """The raw idx files torchvision reads: ``<root>/<ClassName>/raw/...``."""
    return [root / layout.reader / "raw" / name for name in RAW_FILES]


def load_mnist(layout: MnistLayout, spec: DataSpec, seed: int, field: str) -> Dataset:
    """1x28x28 uint8 images; the official test split serves as validation."""
    stats = (layout.mean, layout.std)
    reader = getattr(importlib.import_module("torchvision.datasets"), layout.reader)
    splits = [reader(str(spec.root), train=train, download=spec.download) for train in (True, False)]
    train, val = (make_split(split.data.unsqueeze(1), split.targets, stats) for split in splits)
    return Dataset(train=train, val=val, num_classes=10, input_shape=(1, 28, 28), input_dtype=torch.float32, name=layout.name)
