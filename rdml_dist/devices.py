"""Which torch device a process computes on, from ``runtime.device``: needs torch only, no model or data code."""

import torch


def resolve_device(preference: str) -> torch.device:
    """``auto`` takes the GPU when one is visible (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible to this process")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
