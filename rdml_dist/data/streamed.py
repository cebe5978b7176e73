"""Splits read from a map-style ``torch.utils.data.Dataset`` through DataLoader workers.

For data larger than memory. The shared batch plan is the DataLoader's batch sampler, so every
student reads the same samples at the same step. Per-sample random transforms (a
random-resized crop, say) are made identical across students by seeding torch's RNG with a
seed derived from the step's augmentation seed and the sample's index before each item is
read: transforms must draw from torch's RNG, as torchvision's do. Labels come from the
dataset's ``targets`` once, so label noise and hidden labels work as for in-memory data.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as MapDataset

from rdml_dist.data.split import Batch, BatchTransform, apply_transform

FINGERPRINT_SEED = 0  # the fixed item seed under which the fingerprint's sample is read
ItemKey = tuple[int, int | None]


def item_seed(augment_seed: int, index: int) -> int:
    """One sample's seed within a step: distinct per sample, identical in every student."""
    return (augment_seed + index * 0x9E3779B97F4A7C15) % 2**63


def item_input(item: Any) -> Any:
    """The input of a dataset item: the first element of an (input, label) pair."""
    return item[0] if isinstance(item, (tuple, list)) else item


class SeededItems(MapDataset):
    """Reads ``items[index]`` under a seed of its own, keyed by ``(index, seed)``; None: unseeded."""

    def __init__(self, items: MapDataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __getitem__(self, key: ItemKey) -> Any:
        index, seed = key
        if seed is None:
            return item_input(self.items[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return item_input(self.items[index])


class PlanSampler:
    """A batch sampler whose batches are set before each pass: the plan's steps still to run."""

    def __init__(self) -> None:
        self.keys: list[list[ItemKey]] = []

    def __iter__(self) -> Iterator[list[ItemKey]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class StreamedSplit:
    """One split read item by item from a map-style dataset (prefetched by ``workers`` processes)."""

    items: MapDataset
    labels: torch.Tensor
    clean_labels: torch.Tensor
    workers: int = 2
    transform: BatchTransform | None = None
    _loader: DataLoader | None = field(default=None, init=False, repr=False, compare=False)
    _sampler: PlanSampler = field(default_factory=PlanSampler, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def _loader_for(self, pin_memory: bool) -> DataLoader:
        """One DataLoader per split and process; its workers persist across epochs."""
        if self._loader is None:
            self._loader = DataLoader(
                SeededItems(self.items),
                batch_sampler=self._sampler,
                num_workers=self.workers,
                collate_fn=torch.stack,
                pin_memory=pin_memory,
                persistent_workers=self.workers > 0,
                prefetch_factor=2 if self.workers > 0 else None,
            )
        return self._loader

    def batches(self, plan: Sequence[torch.Tensor], seeds: Sequence[int | None], pin_memory: bool = False) -> Iterator[Batch]:
        """Batches of ``plan`` in order, read ahead by the workers; starting a new pass abandons the last."""
        self._sampler.keys = [
            [(index, None if seed is None else item_seed(seed, index)) for index in indices.tolist()]
            for indices, seed in zip(plan, seeds, strict=True)
        ]
        for indices, seed, inputs in zip(plan, seeds, self._loader_for(pin_memory), strict=True):
            yield apply_transform(self.transform, inputs, seed), self.labels[indices]

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        seeded = SeededItems(self.items)
        return torch.stack([seeded[(int(index), FINGERPRINT_SEED)] for index in positions])

    def example(self) -> torch.Tensor:
        return item_input(self.items[0])
