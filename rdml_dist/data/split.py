"""In-memory splits that hand out normalized (and optionally augmented) batches by index."""

from dataclasses import dataclass

import torch

from rdml_dist.data.augment import crop_and_flip

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) on the [0, 1] scale


@dataclass(frozen=True)
class Split:
    """One split held in memory.

    ``pixels`` is (N, C, H, W): uint8 in 0..255 (kept compact, scaled to [0, 1] per batch) or
    float already on its final scale. ``labels`` are the training targets (int64, -1 =
    unlabeled, possibly noisy); ``clean_labels`` the true ones, so benchmarks can measure noise.
    ``mean``/``std`` are per-channel normalization constants on the [0, 1] scale.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor, augment_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 images (B, C, H, W), normalized, and int64 labels for ``indices``.

        With ``augment`` on and an ``augment_seed`` given, images get a random crop (zero
        padding of 1/8 of the side, 4 pixels at 32x32) and flip decided by the seed alone.
        """
        images = self.pixels[indices].float()
        if self.pixels.dtype == torch.uint8:
            images = images / 255.0
        if self.augment and augment_seed is not None:
            images = crop_and_flip(images, augment_seed, padding=max(1, images.shape[-1] // 8))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images - mean) / std, self.labels[indices]


@dataclass(frozen=True)
class Dataset:
    """A train and a validation split plus the shape facts a model needs."""

    train: Split
    val: Split
    num_classes: int
    in_channels: int
    image_size: int
    name: str


def make_split(pixels: torch.Tensor, labels: torch.Tensor, stats: Stats, augment: bool = False) -> Split:
    """A split whose clean labels are its labels (corruption comes later, on train only)."""
    labels = labels.to(torch.int64)
    mean, std = stats
    return Split(pixels=pixels, labels=labels, clean_labels=labels, mean=mean, std=std, augment=augment)


def channel_stats(pixels: torch.Tensor) -> Stats:
    """Per-channel mean and std on the [0, 1] scale, for sets without published constants.

    uint8 pixels go through a 256-bin histogram per channel, so a large image folder never
    needs a float copy of itself.
    """
    means: list[float] = []
    stds: list[float] = []
    for channel in range(pixels.shape[1]):
        plane = pixels[:, channel]
        if pixels.dtype == torch.uint8:
            counts = torch.bincount(plane.flatten(), minlength=256).double()
            levels = torch.arange(256, dtype=torch.float64) / 255.0
            mean = float((counts * levels).sum() / counts.sum())
            variance = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        else:
            mean = float(plane.double().mean())
            variance = float(plane.double().var(correction=0))
        means.append(mean)
        stds.append(variance**0.5 if variance > 0 else 1.0)
    return tuple(means), tuple(stds)
