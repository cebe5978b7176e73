"""The Rényi step compiled (``rdml_dist/kernels/renyi_passes.c``), where ``pip install`` built it.

A step in torch alone makes about twenty torch calls of a few microseconds each, and passes over
its K×B×C factors that one loop does at once; at small batches and class counts those calls cost
more than the arithmetic. The extension does the whole step in one call for small samples (16 of
them side by side in the vector lanes), and for larger ones the element-wise passes on either side
of torch's first ``bmm`` in one call each per block of samples. Without it, or with
``RDML_DIST_NATIVE=0``, the step runs in torch alone; both agree to float32 rounding.
"""

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor


def _load() -> ModuleType | None:
    if os.environ.get("RDML_DIST_NATIVE", "1") == "0":
        return None
    try:
        from rdml_dist.kernels import _renyi_passes  # type: ignore[attr-defined]  # compiled at install
    except ImportError:
        return None
    return _renyi_passes


_PASSES = _load()
_F32 = torch.float32


def available() -> bool:
    """Whether the compiled passes are built and not switched off."""
    return _PASSES is not None


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Every step within the block in torch alone, as without the extension (to compare the two)."""
    global _PASSES
    saved, _PASSES = _PASSES, None
    try:
        yield
    finally:
        _PASSES = saved


def serves(dtype: torch.dtype, device: torch.device) -> bool:
    """The passes are float32 loops on the CPU; float64 and accelerators stay with torch."""
    return _PASSES is not None and dtype == torch.float32 and device.type == "cpu"


def _factor_weights(alpha: float, temperature: float) -> tuple[float, float, float, float]:
    """The peer's and the own factor's weights on a logit z and on its difference z − m from the
    cohort's mean: z/τ − (1−α)(z − m)/τ and (1−α)(z − m)/τ (see the C source's ``FactorWeights``)."""
    spread = (1 - alpha) / temperature
    return 1 / temperature, -spread, 0.0, spread


# The whole step in lanes serves samples of up to this many logits (K·C) and cohorts of up to 64
# students; beyond, its K×K×16 and K×C×16 arrays leave the first cache and the passes around
# torch's bmm are faster (measured by benchmarks/coordinator_cost.py, which times both).
WHOLE_STEP_MAX_SAMPLE_SIZE = 1024
WHOLE_STEP_MAX_STUDENTS = 64


def whole_step_serves(k: int, classes: int) -> bool:
    """Whether :func:`step` (rather than :func:`factors` and :func:`weights` around torch's bmm) is the faster form."""
    return k <= WHOLE_STEP_MAX_STUDENTS and k * classes <= WHOLE_STEP_MAX_SAMPLE_SIZE


def factors(block: Tensor, alpha: float, temperature: float, into: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
    """The peer and own factors of ``block`` (rows×K×C logits) into ``into`` (rows×2×K×C) and their
    row shifts into ``shifts`` (rows×2K); as :func:`rdml_dist.kernels.mimicry._factors`."""
    rows, k, classes = block.shape
    block = block.contiguous()
    _check_buffers((block, _F32, rows * k * classes), (into, _F32, rows * 2 * k * classes), (shifts, _F32, rows * 2 * k))
    _PASSES.factors(  # type: ignore[union-attr]
        block.data_ptr(), rows, k, classes, *_factor_weights(alpha, temperature), into.data_ptr(), shifts.data_ptr()
    )
    peer, own = into.unbind(1)
    return peer, own


def weights(
    overlap: Tensor, shifts: Tensor, alpha: float, scale: float, trusted_floor: float, target_weights: Tensor | None,
    loss_sums: Tensor, untrusted: Tensor,
) -> int:
    """The overlaps (rows×K×K) overwritten by the transposed gradient weights Vᵀ of
    :func:`rdml_dist.kernels.mimicry._write_gradients`, the transposed target weights into
    ``target_weights`` when given, and Σ_b Σ_{j≠k} logZ_jk added to ``loss_sums`` (K float64).

    ``untrusted`` (rows, uint8) flags the samples with an overlap below ``trusted_floor`` (or not
    finite): their weights are not to be used, and their losses are left out of the sums. Returns
    how many there are.
    """
    rows, k, _ = overlap.shape
    _check_buffers(
        (overlap, _F32, rows * k * k), (shifts, _F32, rows * 2 * k), (target_weights, _F32, rows * k * k),
        (loss_sums, torch.float64, k), (untrusted, torch.uint8, rows),
    )
    return _PASSES.weights(  # type: ignore[union-attr]
        overlap.data_ptr(), rows, k, shifts.data_ptr(), alpha, scale, trusted_floor,
        0 if target_weights is None else target_weights.data_ptr(), loss_sums.data_ptr(), untrusted.data_ptr(),
    )


def step(
    by_sample: Tensor, alpha: float, temperature: float, scale: float, trusted_floor: float, grads: Tensor,
    targets: Tensor | None, loss_sums: Tensor, untrusted: Tensor, losses: Tensor,
) -> int:
    """The whole step of ``by_sample`` (B×K×C float32) in one call, matrix products included:
    gradients, targets when asked for, and the losses' sums, with each sample's flag as :func:`weights`;
    if no sample is flagged, also the batch-mean losses (K float32)."""
    rows, k, classes = by_sample.shape
    by_sample = by_sample.contiguous()
    size = rows * k * classes
    _check_buffers(
        (by_sample, _F32, size), (grads, _F32, size), (targets, _F32, size), (losses, _F32, k),
        (loss_sums, torch.float64, k), (untrusted, torch.uint8, rows),
    )
    return _PASSES.step(  # type: ignore[union-attr]
        by_sample.data_ptr(), rows, k, classes, *_factor_weights(alpha, temperature), alpha, scale, trusted_floor,
        grads.data_ptr(), 0 if targets is None else targets.data_ptr(), loss_sums.data_ptr(), untrusted.data_ptr(),
        losses.data_ptr(),
    )


def _check_buffers(*buffers: tuple[Tensor | None, torch.dtype, int]) -> None:
    """The compiled loops index dense CPU buffers of fixed dtypes and sizes by address: anything else
    would be read or written wrongly, not slowly, so it is refused here. Each buffer comes with its
    dtype and the number of elements the loops use (None: not given)."""
    for tensor, dtype, needed in buffers:
        if tensor is None:
            continue
        if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"the compiled Rényi passes need contiguous {dtype} CPU buffers, got {tensor.dtype} on {tensor.device} "
                f"with strides {tensor.stride()}"
            )
        if tensor.numel() < needed:
            raise ValueError(f"the compiled Rényi passes need {needed} elements in a {dtype} buffer, got {tensor.numel()}")
