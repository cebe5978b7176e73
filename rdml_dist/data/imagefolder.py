"""Image folders (torchvision ``ImageFolder`` layout): decoded into memory when they fit, streamed otherwise.

At ``image_size`` (default 32) a folder whose decoded uint8 pixels fit in
``data.memory_limit_mb`` is decoded once and normalized with its training split's own
statistics. A larger one (ImageNet at 224×224, say) is read per step through DataLoader
workers: training images get a random-resized crop and flip when ``augment`` is on (seeded per
step and sample, so identical in every student), otherwise a plain resize, and both splits are
normalized with the ImageNet constants, since per-folder statistics would need a pass over it all.
torchvision and PIL are imported when a folder is read, not by every process that imports the registry.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from rdml_dist.data.holdout import stratified_holdout
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, Split, channel_stats, make_split
from rdml_dist.data.streamed import StreamedSplit
from rdml_dist.errors import ConfigError

DEFAULT_IMAGE_SIZE = 32
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEBIBYTE = 2**20


def has_split_folders(root: Path) -> bool:
    """True for the ``root/train/<class>`` + ``root/val/<class>`` layout."""
    return (root / "train").is_dir() and (root / "val").is_dir()


@dataclass(frozen=True)
class Listing:
    """The files of one split: a folder and, for a held-out split, the chosen positions in it."""

    folder: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    positions: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        return labels if self.positions is None else labels[self.positions]


def _list(folder: Path, field: str) -> Listing:
    from torchvision.datasets import ImageFolder

    try:
        listing = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"{field}.root", f"no image folder at {folder} ({error})") from error
    return Listing(folder, listing.samples, listing.classes)


def _listings(spec: DataSpec, seed: int, field: str) -> tuple[Listing, Listing]:
    """``train``/``val`` sub-folders when present, else one folder split by ``val_fraction``."""
    root = Path(str(spec.root))
    if has_split_folders(root):
        train, val = _list(root / "train", field), _list(root / "val", field)
        if val.classes != train.classes:
            raise ConfigError(f"{field}.root", f"{root / 'val'} has classes {val.classes}, {root / 'train'} has {train.classes}")
        return train, val
    whole = _list(root, field)
    train_positions, val_positions = stratified_holdout(whole.labels, spec.val_fraction, seed, field)
    return (
        Listing(root, whole.samples, whole.classes, train_positions),
        Listing(root, whole.samples, whole.classes, val_positions),
    )


def _decode(listing: Listing, size: int) -> torch.Tensor:
    """Every image of ``listing`` as RGB uint8 (N, 3, size, size)."""
    paths = [path for path, _ in listing.samples]
    if listing.positions is not None:
        paths = [paths[position] for position in listing.positions.tolist()]
    from PIL import Image

    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for position, path in enumerate(paths):
        with Image.open(path) as image:
            pixels[position] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _streamed(listing: Listing, size: int, augment: bool, workers: int) -> StreamedSplit:
    """A split read per item, with torchvision transforms that draw from torch's (seeded) RNG."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    resize = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if augment else [transforms.Resize((size, size))]
    pipeline = transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)])
    folder = ImageFolder(str(listing.folder), transform=pipeline)
    items = folder if listing.positions is None else Subset(folder, listing.positions.tolist())
    return StreamedSplit(items=items, labels=listing.labels, clean_labels=listing.labels, workers=workers)


def load_imagefolder(spec: DataSpec, seed: int, field: str) -> Dataset:
    """In memory or streamed by decoded size against ``data.memory_limit_mb`` (see the module docstring)."""
    size = spec.image_size or DEFAULT_IMAGE_SIZE
    train_listing, val_listing = _listings(spec, seed, field)
    decoded_mb = (len(train_listing.labels) + len(val_listing.labels)) * 3 * size * size / MEBIBYTE
    train: Split
    val: Split
    if decoded_mb <= spec.memory_limit_mb:
        train_pixels = _decode(train_listing, size)
        stats = channel_stats(train_pixels)
        train = make_split(train_pixels, train_listing.labels, stats)
        val = make_split(_decode(val_listing, size), val_listing.labels, stats)
    else:
        train = _streamed(train_listing, size, bool(spec.augment), spec.workers)
        val = _streamed(val_listing, size, False, spec.workers)
    return Dataset(
        train=train,
        val=val,
        num_classes=len(train_listing.classes),
        input_shape=(3, size, size),
        input_dtype=torch.float32,
        name="imagefolder",
    )
