"""The built-in data sets: how each loads and what it needs under ``data.root``."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rdml_dist.data.cifar import CIFAR10, CIFAR100, cifar_files, load_cifar
from rdml_dist.data.digits import load_digits
from rdml_dist.data.imagefolder import load_imagefolder
from rdml_dist.data.mnist import FASHION_MNIST, MNIST, load_mnist, mnist_files
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset

Loader = Callable[[DataSpec, int, str], Dataset]


@dataclass(frozen=True)
class Source:
    """One built-in data set: its loader ``(spec, seed, field) -> Dataset`` and its files.

    ``files`` lists what the loader opens under the root (checked before launch); ``None``
    means the set needs no root at all.
    """

    load: Loader
    files: Callable[[Path], list[Path]] | None = None
    downloadable: bool = False


def _no_fixed_files(root: Path) -> list[Path]:
    """Image folders have no fixed file names; the root itself is checked."""
    return []


SOURCES: dict[str, Source] = {
    "digits": Source(load_digits),
    "cifar10": Source(partial(load_cifar, CIFAR10), partial(cifar_files, CIFAR10), downloadable=True),
    "cifar100": Source(partial(load_cifar, CIFAR100), partial(cifar_files, CIFAR100), downloadable=True),
    "mnist": Source(partial(load_mnist, MNIST), partial(mnist_files, MNIST), downloadable=True),
    "fashion_mnist": Source(partial(load_mnist, FASHION_MNIST), partial(mnist_files, FASHION_MNIST), downloadable=True),
    "imagefolder": Source(load_imagefolder, _no_fixed_files),
}
