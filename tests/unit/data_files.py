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


def _separable(count: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature vectors whose class shifts a few coordinates: learnable, but not at once."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    inputs = torch.randn(count, features, generator=generator)
    inputs[torch.arange(count), labels] += 2.0
    return inputs, labels


def feature_vectors(count: int = 300, features: int = 12, classes: int = 4, seed: int = 0) -> tuple:
    """(N, D) float32 feature vectors in memory."""
    return _separable(count, features, classes, seed), _separable(count // 4, features, classes, seed + 1)


def non_square_images(count: int = 96, height: int = 12, width: int = 20) -> tuple:
    """(N, 3, 12, 20) uint8 images whose class sets the brightness of one channel."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (count,), generator=generator)
    images = torch.randint(0, 120, (count, 3, height, width), dtype=torch.uint8, generator=generator)
    images[torch.arange(count), labels] += 100
    half = count // 2
    return (images[:half], labels[:half]), (images[half:], labels[half:])


class IndexedFeatures(torch.utils.data.Dataset):
    """A map-style dataset computing each item from its index (nothing held but the labels), with ``targets``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self._inputs = inputs
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._inputs[index].clone(), self.targets[index]


def streamed_features(count: int = 300, features: int = 12, classes: int = 4, seed: int = 0) -> tuple:
    """The data of :func:`feature_vectors`, as map-style datasets to be read through DataLoader workers."""
    return tuple(IndexedFeatures(*pair) for pair in feature_vectors(count, features, classes, seed))


class Unlabelled(torch.utils.data.Dataset):
    """Broken: a map-style dataset without ``targets``."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3), 0


def without_targets() -> tuple:
    return Unlabelled(), Unlabelled()


def image_items() -> tuple:
    """Broken: items hold PIL images (no ToTensor)."""

    class PilItems(Unlabelled):
        targets = [0, 1, 0, 1]

        def __getitem__(self, index: int) -> tuple[Image.Image, int]:
            return Image.new("RGB", (4, 4)), self.targets[index]

    return PilItems(), PilItems()


def too_few_targets() -> tuple:
    """Broken: four items, three targets."""
    dataset = Unlabelled()
    dataset.targets = [0, 1, 0]  # type: ignore[attr-defined]
    return dataset, dataset


def token_ids(count: int = 200, length: int = 10, vocab: int = 30) -> tuple:
    """(N, L) int64 token ids; the class is the first token modulo 3."""
    tokens = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(2))
    labels = tokens[:, 0] % 3
    return (tokens[:150], labels[:150]), (tokens[150:], labels[150:])


def flip_tokens(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batch hook: reverse the token order of a random half of the batch."""
    flipped = torch.rand(len(tokens), generator=generator) < 0.5
    return torch.where(flipped[:, None], tokens.flip(1), tokens)
