"""The per-epoch batch order that every student computes on its own and must agree on."""

import hashlib

import torch

from rdml_dist.data.seeds import derive_seed


def batch_plan(num_samples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[torch.Tensor]:
    """Shuffle ``range(num_samples)`` for ``epoch`` and cut it into batches of int64 indices.

    The permutation is ``torch.randperm`` on a CPU ``torch.Generator`` seeded with
    ``derive_seed("batch_plan", seed, epoch)`` (blake2b of ``"batch_plan:<seed>:<epoch>"``,
    first 8 bytes little-endian, top bit cleared), so students that share ``seed`` get the same
    batches without talking to each other; the CPU Mersenne-Twister stream does not depend on
    the platform. ``drop_last`` drops a final short batch.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(derive_seed("batch_plan", seed, epoch))
    batches = list(torch.randperm(num_samples, generator=generator).split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def augment_seed(seed: int, epoch: int, step: int) -> int:
    """The augmentation seed for one step, so every student draws the same crops and flips."""
    return derive_seed("augment", seed, epoch, step)


def indices_hash(indices: torch.Tensor) -> str:
    """16 hex chars identifying a batch: blake2b of the indices as int64 little-endian bytes.

    Sent with every exchanged message so the coordinator can reject a student on another batch.
    """
    values = indices.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    return hashlib.blake2b(values.astype("<i8", copy=False).tobytes(), digest_size=8).hexdigest()
