"""Batch augmentation as tensor ops, deterministic in a seed so all students see the same images."""

import torch
import torch.nn.functional as F


def crop_and_flip(images: torch.Tensor, seed: int, padding: int) -> torch.Tensor:
    """Random crop after ``padding`` pixels of zero padding, plus a random horizontal flip.

    Offsets and flips are drawn per sample from a CPU generator seeded with ``seed``; the crop
    and flip are one gather on the padded batch, so there is no per-image Python loop.
    """
    count, channels, height, width = images.shape
    generator = torch.Generator().manual_seed(seed)
    top = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    flip = torch.randint(0, 2, (count,), generator=generator).bool()
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, None, :]
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    samples = torch.arange(count)[:, None, None, None]
    planes = torch.arange(channels)[None, :, None, None]
    return padded[samples, planes, rows, cols]
