"""Deliberate damage to training labels: symmetric noise and hidden (unlabeled) samples."""

from dataclasses import replace

import torch

from rdml_dist.data.seeds import derive_seed
from rdml_dist.data.split import Split


def _chosen(count: int, fraction: float, purpose: str, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """Exactly ``round(fraction * count)`` distinct sample indices, from a generator of their own.

    Each purpose has its own stream, so turning one corruption on never moves the other's choice.
    """
    generator = torch.Generator().manual_seed(derive_seed(purpose, seed))
    return torch.randperm(count, generator=generator)[: round(fraction * count)], generator


def corrupt_labels(split: Split, num_classes: int, label_noise: float, unlabeled_fraction: float, seed: int) -> Split:
    """Replace ``label_noise`` of the labels by a uniformly random *other* class, then hide
    ``unlabeled_fraction`` of them as -1. ``clean_labels`` stay untouched.
    """
    labels = split.clean_labels.clone()
    noisy, generator = _chosen(len(labels), label_noise, "label_noise", seed)
    shift = torch.randint(1, num_classes, (len(noisy),), generator=generator)
    labels[noisy] = (labels[noisy] + shift) % num_classes
    hidden, _ = _chosen(len(labels), unlabeled_fraction, "unlabeled", seed)
    labels[hidden] = -1
    return replace(split, labels=labels)
