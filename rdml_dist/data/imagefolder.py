"""Image folders (torchvision ``ImageFolder`` layout) decoded once into memory."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from rdml_dist.data.holdout import stratified_holdout
from rdml_dist.data.spec import DataSpec
from rdml_dist.data.split import Dataset, channel_stats, make_split
from rdml_dist.errors import ConfigError

DEFAULT_IMAGE_SIZE = 32


def has_split_folders(root: Path) -> bool:
    """True for the ``root/train/<class>`` + ``root/val/<class>`` layout."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def _decode(folder: Path, size: int, field: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image under ``folder/<class>/`` as RGB uint8 (N, 3, size, size), labels, class names."""
    try:
        listing = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"{field}.root", f"no image folder at {folder} ({error})") from error
    pixels = np.empty((len(listing.samples), size, size, 3), dtype=np.uint8)
    for position, (path, _) in enumerate(listing.samples):
        with Image.open(path) as image:
            pixels[position] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(listing.targets, dtype=torch.int64), listing.classes


def load_imagefolder(spec: DataSpec, seed: int, field: str) -> Dataset:
    """``train``/``val`` sub-folders when present, else one folder split by ``val_fraction``.

    Images are resized to ``image_size`` (default 32) and normalized with the training split's
    own per-channel statistics.
    """
    root = Path(str(spec.root))
    size = spec.image_size or DEFAULT_IMAGE_SIZE
    if has_split_folders(root):
        train_pixels, train_labels, classes = _decode(root / "train", size, field)
        val_pixels, val_labels, val_classes = _decode(root / "val", size, field)
        if val_classes != classes:
            raise ConfigError(f"{field}.root", f"{root / 'val'} has classes {val_classes}, {root / 'train'} has {classes}")
    else:
        pixels, labels, classes = _decode(root, size, field)
        train, val = stratified_holdout(labels, spec.val_fraction, seed, field)
        train_pixels, train_labels, val_pixels, val_labels = pixels[train], labels[train], pixels[val], labels[val]
    stats = channel_stats(train_pixels)
    return Dataset(
        train=make_split(train_pixels, train_labels, stats),
        val=make_split(val_pixels, val_labels, stats),
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        name="imagefolder",
    )
