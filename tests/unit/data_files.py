"""Tiny data sets written in the real on-disk formats, plus data factories for the factory tests.

Each writer returns the arrays it wrote so tests can check that loading round-trips them.
"""

import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

Arrays = tuple[np.ndarray, np.ndarray]


def _random_images(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)


def _write_pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def write_cifar(root: Path, variant: str, per_file: int, seed: int = 0) -> tuple[Arrays, Arrays]:
    """CIFAR-10 (5 data batches + test batch) or CIFAR-100 (train + test) pickles under ``root``.

    Returns ((train images N x 3 x 32 x 32, labels), (test images, labels)).
    """
    rng = np.random.default_rng(seed)
    if variant == "cifar10":
        folder, key, classes = "cifar-10-batches-py", "labels", 10
        train_names, test_names = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        folder, key, classes = "cifar-100-python", "fine_labels", 100
        train_names, test_names = ["train"], ["test"]
    written: list[Arrays] = []
    for names in (train_names, test_names):
        images = _random_images(rng, per_file * len(names), (3, 32, 32))
        labels = rng.integers(0, classes, size=len(images))
        for part, name in enumerate(names):
            rows = slice(part * per_file, (part + 1) * per_file)
            entry = {"batch_label": name, "data": images[rows].reshape(per_file, 3072), key: labels[rows].tolist()}
            if variant == "cifar100":
                entry["coarse_labels"] = (labels[rows] // 5).tolist()
            _write_pickle(root / folder / name, entry)
        written.append((images, labels))
    return written[0], written[1]


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """idx format: big-endian magic, one big-endian uint32 per dimension, then the raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())


def write_mnist(root: Path, folder: str, train: int, test: int, seed: int = 0) -> tuple[Arrays, Arrays]:
    """Raw idx files under ``root/<folder>/raw`` (folder ``MNIST`` or ``FashionMNIST``)."""
    rng = np.random.default_rng(seed)
    written: list[Arrays] = []
    for prefix, count in (("train", train), ("t10k", test)):
        images = _random_images(rng, count, (28, 28))
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", 2051, images)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", 2049, labels)
        written.append((images, labels))
    return written[0], written[1]


def write_imagefolder(root: Path, classes: list[str], per_class: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/<class>/NNN.png`` RGB images; returns each class's images (per_class x size x size x 3)."""
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    for name in classes:
        images = _random_images(rng, per_class, (size, size, 3))
        (root / name).mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(images):
            Image.fromarray(image, mode="RGB").save(root / name / f"{number:03d}.png")
        written[name] = images
    return written


def tensor_pair(seed: int, count: int = 40, classes: int = 4) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """A valid factory result: a TensorDataset for train, a plain tuple for val, uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 6, 6), generator=generator, dtype=torch.uint8)
    labels = torch.arange(count) % classes
    half = count // 2
    return TensorDataset(images[:half], labels[:half]), (images[half:], labels[half:])


def float_images(count: int = 12) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Float images are used as they are: no scaling, no normalization."""
    images = torch.linspace(-1, 1, count * 4).view(count, 1, 2, 2)
    labels = torch.tensor([0, 1, 2] * (count // 3))
    return (images, labels), (images, labels)


def wrong_shape() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Broken: validation samples of another shape than the training samples."""
    return (torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64)), (torch.zeros(4, 6), torch.zeros(4, dtype=torch.int64))


def not_a_pair() -> str:
    """Broken: neither a Dataset nor a (train, val) pair."""
    return "data"
