"""Validation split for data sets that ship without an official test split."""

import torch

from rdml_dist.data.seeds import derive_seed
from rdml_dist.errors import ConfigError


def stratified_holdout(labels: torch.Tensor, val_fraction: float, seed: int, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) index tensors holding out ``val_fraction`` of every class.

    Per class so small classes keep their share; seeded through ``derive_seed`` so every
    student (each loading the data itself) ends up with the same split.
    """
    generator = torch.Generator().manual_seed(derive_seed("holdout", seed))
    train_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held = round(val_fraction * len(members))
        val_parts.append(members[:held])
        train_parts.append(members[held:])
    train = torch.cat(train_parts).sort().values
    val = torch.cat(val_parts).sort().values
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            f"{field}.val_fraction",
            f"{val_fraction} leaves an empty {'validation' if len(val) == 0 else 'training'} split for {len(labels)} samples",
        )
    return train, val
