"""CIFAR-10/100 read from the standard python-pickle layout.

Our own reader rather than torchvision's class, which insists on md5 sums; torchvision is only
imported to download when the user asks for it. The files are pickles, and a data root may be
shared: they are read by an unpickler that admits only what the format holds (dicts, lists,
strings, numbers and numpy arrays), so a crafted file cannot run code in the students.
"""

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, make_split


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and how to read them."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    downloader: str  # the torchvision.datasets class that downloads it


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    downloader="CIFAR10",
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    downloader="CIFAR100",
)


def cifar_files(layout: CifarLayout, root: Path) -> list[Path]:
    """Every file the reader opens, for checking a root before anything is launched."""
    return [root / layout.folder / name for name in layout.train_files + layout.test_files]


# The only globals a CIFAR pickle names: numpy's array reconstruction (under numpy 1's and 2's module
# names) and the codec Python 3 uses for byte strings in protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class CifarFileError(ValueError):
    """A CIFAR file that names something the format never holds (a crafted or foreign pickle)."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise CifarFileError(f"it names {module}.{name}, which no CIFAR file holds; refusing to load it")
        return getattr(importlib.import_module(module), name)


def read_cifar_file(path: Path) -> dict[str, Any]:
    """One CIFAR batch file, through the restricted unpickler (``CifarFileError`` names what it refused)."""
    with open(path, "rb") as handle:
        try:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
        except CifarFileError as error:
            raise CifarFileError(f"{path}: {error}") from None
    if not isinstance(entry, dict):
        raise CifarFileError(f"{path}: holds a {type(entry).__name__}, not a CIFAR batch (a dict)")
    return entry


def _read(layout: CifarLayout, root: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    for name in names:
        entry = read_cifar_file(root / layout.folder / name)
        pixels.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[layout.label_key])
    return torch.from_numpy(np.concatenate(pixels)), torch.tensor(labels, dtype=torch.int64)


def load_cifar(layout: CifarLayout, spec: DataSpec, seed: int, field: str) -> Dataset:
    """Official train split for training, test split for validation; crop+flip on by default."""
    root = Path(str(spec.root))
    if spec.download:
        getattr(importlib.import_module("torchvision.datasets"), layout.downloader)(root, train=True, download=True)
    stats = (layout.mean, layout.std)
    return Dataset(
        train=make_split(*_read(layout, root, layout.train_files), stats, augment=True),
        val=make_split(*_read(layout, root, layout.test_files), stats),
        num_classes=layout.num_classes,
        input_shape=(3, 32, 32),
        input_dtype=torch.float32,
        name=layout.name,
    )
