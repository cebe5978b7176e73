"""How α and the mimicry weight λ evolve over training (both evaluated per step, in fractional epochs)."""

import math

from rdml_dist.config import MimicryConfig


def alpha_at(mimicry: MimicryConfig, progress_epochs: float, total_epochs: int) -> float:
    """α at a point of training: constant, or cosine-annealed from ``alpha`` down to ``floor``."""
    if mimicry.alpha_schedule.kind == "constant":
        return mimicry.alpha
    fraction = min(max(progress_epochs / total_epochs, 0.0), 1.0)
    floor = mimicry.alpha_schedule.floor
    return floor + (mimicry.alpha - floor) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def mimicry_weight_at(mimicry: MimicryConfig, progress_epochs: float) -> float:
    """λ: zero during burn-in, then a linear ramp over ``warmup_epochs``, then ``weight``.

    A heterogeneous cohort's weak students can drag a strong one down early; burn-in and warm-up
    let every student learn from labels first.
    """
    after_burn_in = progress_epochs - mimicry.burn_in_epochs
    if after_burn_in < 0:
        return 0.0
    if mimicry.warmup_epochs == 0:
        return mimicry.weight
    return mimicry.weight * min(after_burn_in / mimicry.warmup_epochs, 1.0)
