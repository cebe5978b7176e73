"""The kernels behind :mod:`rdml_dist.divergence`: how the cohort's mimicry gradients are computed fast.

:mod:`rdml_dist.divergence` holds the public API and the registry; this module holds what a new
divergence never needs to read: the per-sample divergences in log space, the closed-form Rényi and
KL passes over blocks of rows (the compiled passes of :mod:`rdml_dist.kernels.native` where they load,
torch otherwise), the exact recomputation of underflowed pairs, and the buffers a caller reuses
between steps (:class:`MimicryWorkspace`). The closed form and its numerics are DESIGN §1.
"""

import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rdml_dist.kernels import native


class MimicryResult(NamedTuple):
    """Per-student mimicry quantities for one step of a cohort of K students.

    ``losses[k]`` (K,) is student k's mimicry loss (mean over peers, batch mean, no λ or τ²);
    ``grads[k]`` (B×C) is ∂ losses[k] / ∂ logits[k] with the peers held constant;
    ``targets[k]`` (B×C) is the effective target with ``grads = (softmax(z/τ) − targets) / (τ·B)``:
    for ``renyi``/``kl`` this is the Rényi mimicry target T_k, a probability distribution. It is
    None when the call asked for gradients only (``with_targets=False``, as the coordinator does).
    """

    targets: Tensor | None
    grads: Tensor
    losses: Tensor

def kl_from_log_probs(target_logp: Tensor, input_logp: Tensor) -> Tensor:
    """KL(p‖q) per sample from log-probabilities.

    Terms where p underflows to 0 are exactly zero, and so is their gradient (``xlogy(p, p)`` would
    give 0/0 = NaN there under autograd, e.g. in JS for very confident students).
    """
    target_probs = target_logp.exp()
    return (target_probs * torch.where(target_probs > 0, target_logp - input_logp, 0.0)).sum(-1)


def renyi_from_log_probs(target_logp: Tensor, input_logp: Tensor, alpha: float) -> Tensor:
    """D_α(p‖q) per sample via logsumexp(α ℓ_p + (1−α) ℓ_q) / (α − 1), with the α ∈ {0, 1} limits."""
    if alpha == 0:
        return torch.zeros(target_logp.shape[:-1], dtype=target_logp.dtype, device=target_logp.device)
    if alpha == 1:
        return kl_from_log_probs(target_logp, input_logp)
    return torch.logsumexp(alpha * target_logp + (1 - alpha) * input_logp, dim=-1) / (alpha - 1)


def js_from_log_probs(target_logp: Tensor, input_logp: Tensor) -> Tensor:
    """Jensen–Shannon divergence per sample: ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2."""
    log_mixture = torch.logsumexp(torch.stack(torch.broadcast_tensors(target_logp, input_logp)), dim=0) - math.log(2)
    return 0.5 * (kl_from_log_probs(target_logp, log_mixture) + kl_from_log_probs(input_logp, log_mixture))


# Upper bound on the elements of one temporary chunk (exactly recomputed pairs, peers of the generic
# path): peak memory stays O(K·B·C) plus this, whatever the cohort size.
CHUNK_ELEMENTS = 1 << 16


def off_diagonal_mean_matrix(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """K×K matrix M with M[j, k] = 1/(K−1) for j ≠ k: averages over peers by one contraction."""
    return (1 - torch.eye(k, dtype=dtype, device=device)) / (k - 1)


def _saturating_exp_(x: Tensor) -> Tensor:
    """In-place exp that stops at the smallest normal number instead of underflowing.

    Subnormal or zero results make exp one to two orders of magnitude slower on CPUs (confident
    students produce many), and where this is used such terms are negligible by construction.
    """
    return x.clamp_(min=math.log(torch.finfo(x.dtype).tiny) + 1).exp_()


class MimicryWorkspace:
    """Buffers one caller keeps between calls of :func:`mimicry_gradients` (the coordinator: one a step).

    A step then writes into memory that is already mapped, and often still cached, instead of
    faulting in fresh pages (tens of MB a step at K = 64, C = 1000). A result computed with a
    workspace lives in it: it is valid until the workspace's next use, and the caller must be done
    with it by then. Each buffer keeps its largest size, so a short last batch costs nothing.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], Tensor] = {}  # a step asks for the same views every time

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The buffer ``name`` viewed as ``shape`` (uninitialised; made anew only to grow or change dtype/device)."""
        view = self._views.get((name, shape))
        if view is not None and view.dtype == dtype and view.device == device:
            return view
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
            self._views = {key: kept for key, kept in self._views.items() if key[0] != name}  # views of the old one
        view = self._views[(name, shape)] = buffer[:size].view(shape)
        return view


def _empty(
    workspace: MimicryWorkspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A buffer from ``workspace``, or a fresh tensor without one."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.empty(name, shape, dtype, device)


class _RenyiBuffers(NamedTuple):
    """What the pairwise Rényi computation writes, laid out by sample so a block of rows is a slice.

    ``grads`` (B×K×C) is scale·(q_k − T_k), ``targets`` (B×K×C or None) T_k. ``normalisers``
    (B×(K+2)×K) holds per sample the K×K log-overlaps (:attr:`log_overlap`) and below them the peer
    and own factors' row shifts (:attr:`shifts`, 2×K); they give every
    logZ_jk = logsumexp_c(α ℓ_j + (1−α) ℓ_k) through :func:`_normaliser_parts`. One buffer, so that
    the losses sum all of them over the batch in one reduction.
    """

    grads: Tensor
    targets: Tensor | None
    normalisers: Tensor

    @property
    def log_overlap(self) -> Tensor:
        """log Σ_c a_jc·s_kc of the shifted factors, rows×K(j)×K(k)."""
        return self.normalisers[:, :-2]

    @property
    def shifts(self) -> Tensor:
        """The peer factors' and the own factors' row shifts, rows×2×K."""
        return self.normalisers[:, -2:]

    @classmethod
    def empty(
        cls, batch: int, k: int, classes: int, dtype: torch.dtype, device: torch.device, with_targets: bool,
        workspace: MimicryWorkspace | None = None,
    ) -> "_RenyiBuffers":
        """Buffers for ``batch`` samples (targets only when asked for)."""
        return cls(
            _empty(workspace, "grads", (batch, k, classes), dtype, device),
            _empty(workspace, "targets", (batch, k, classes), dtype, device) if with_targets else None,
            _empty(workspace, "normalisers", (batch, k + 2, k), dtype, device),
        )

    def rows(self, rows: slice) -> "_RenyiBuffers":
        """The views one block of samples writes into."""
        return _RenyiBuffers(self.grads[rows], None if self.targets is None else self.targets[rows], self.normalisers[rows])

    def assign(self, samples: Tensor, other: "_RenyiBuffers") -> None:
        """Overwrite the rows ``samples`` with ``other`` (same fields, any dtype)."""
        for buffer, source in zip(self, other):
            if buffer is not None:
                buffer[samples] = source.to(buffer.dtype)


def _normaliser_parts(buffers: _RenyiBuffers, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """log Σ_c e^{z_k/τ} and the parts u_j, v_k of logZ_jk = log overlap_jk + u_j + v_k (all rows×K)."""
    peer_shift, own_shift = buffers.shifts.unbind(1)
    own_lse = buffers.log_overlap.diagonal(dim1=1, dim2=2) + peer_shift + own_shift  # logZ_kk = 0
    return own_lse, torch.sub(peer_shift, own_lse, alpha=alpha), torch.sub(own_shift, own_lse, alpha=1 - alpha)


def _pairwise_renyi_losses(buffers: _RenyiBuffers, alpha: float) -> Tensor:
    """Student k's loss 1/((K−1)(α−1)) · Σ_{j≠k} logZ_jk, batch mean (see :func:`_pairwise_renyi_loss_sums`)."""
    return _losses_from_sums(_pairwise_renyi_loss_sums(buffers, alpha), alpha, buffers.normalisers.shape[0], buffers.grads.dtype)


def _losses_from_sums(loss_sums: Tensor, alpha: float, batch: int, dtype: torch.dtype) -> Tensor:
    """The batch-mean losses (in ``dtype``) from Σ_b Σ_{j≠k} logZ_jk (K, float64)."""
    k = loss_sums.shape[0]
    return torch.div(loss_sums, (k - 1) * (alpha - 1) * batch, out=torch.empty(k, dtype=dtype, device=loss_sums.device))


def _pairwise_renyi_loss_sums(buffers: _RenyiBuffers, alpha: float) -> Tensor:
    """Σ_b Σ_{j≠k} logZ_jk for every student k (float64), from one sum over the batch.

    logZ_jk = log overlap_jk + u_j + v_k (:func:`_normaliser_parts`) is linear in the saved
    log-overlaps and shifts, so with their sums over the batch (A_k of log overlap_jk over j, D_k of
    its diagonal, P_k and S_k of the peer and own shifts)
    Σ_b Σ_{j≠k} logZ_jk = A_k + K(α−1)(D_k + P_k) + Kα S_k + Σ_j ((1−α)P_j − αD_j − αS_j).
    The terms cancel to a far smaller loss (weights up to Kα), so the sums are taken in float64.
    Small cohorts apply this as one matrix to all the sums (one call), larger ones part by part (the
    matrix grows as K³).
    """
    k = buffers.normalisers.shape[2]
    sums = torch.sum(buffers.normalisers, 0, dtype=torch.float64)  # (K+2)×K
    if k <= _WHOLE_LOSS_MAP_MAX_K:
        constant, per_alpha = torch.mv(_whole_loss_map(k, sums.device), sums.view(-1)).view(2, k)
        return torch.add(constant, per_alpha, alpha=alpha)
    parts = torch.empty(4, k, dtype=torch.float64, device=sums.device)  # A, P, S, D
    torch.sum(sums[:k], 0, out=parts[0])
    parts[1:3] = sums[k:]
    parts[3] = sums.diagonal()
    own, shared = torch.mm(_loss_weights(alpha, k, sums.device), parts)
    return torch.add(own, shared.sum())


_WHOLE_LOSS_MAP_MAX_K = 16


@functools.lru_cache(maxsize=64)
def _loss_weights(alpha: float, k: int, device: torch.device) -> Tensor:
    """The coefficients (2×4) of A, P, S, D in student k's own term and in the term Σ_j shared by all."""
    return torch.tensor(
        [[1.0, k * (alpha - 1), k * alpha, k * (alpha - 1)], [0.0, 1 - alpha, -alpha, -alpha]], dtype=torch.float64, device=device
    )


@functools.lru_cache(maxsize=16)
def _whole_loss_map(k: int, device: torch.device) -> Tensor:
    """The 2K × (K+2)·K float64 maps W₀ (rows :K) and W₁ (rows K:), W₀ + α W₁ taking the batch sums of
    ``normalisers`` (flattened) to (K−1)(α−1)·B times the losses; independent of α, so that a schedule
    changing α every step rebuilds nothing. The coefficients of :func:`_loss_weights`, spread out."""
    selections = torch.zeros(4, k, k + 2, k, dtype=torch.float64, device=device)  # A, P, S, D of student k
    students = torch.arange(k, device=device)
    selections[0, students, :k, students] = 1
    selections[1, students, k, students] = 1
    selections[2, students, k + 1, students] = 1
    selections[3, students, students, students] = 1
    at_zero, at_one = _loss_weights(0.0, k, device), _loss_weights(1.0, k, device)  # affine in α
    maps = [at_zero, at_one - at_zero]
    own = [torch.einsum("i,ikn->kn", weights[0], selections.flatten(2)) for weights in maps]
    shared = [torch.einsum("i,in->n", weights[1], selections.flatten(2).sum(1)) for weights in maps]
    return torch.cat([own[0] + shared[0], own[1] + shared[1]])


def _pairwise_renyi(z: Tensor, alpha: float, temperature: float, scale: float, out: _RenyiBuffers) -> None:
    """Pairwise Rényi gradients of a block of samples (``z``: rows×K×C raw logits, any strides) into ``out``.

    The careful path, for the samples whose overlaps :func:`_factored_block` could not trust:
    the factored form (:func:`_factored_pairs`) serves almost every pair. In float32 the samples
    where some pair's overlap underflows are redone in float64, whose exponent range is ten times
    wider; the pairs that underflow even there (peers with essentially disjoint support) are
    recomputed exactly. So the cost grows with the number of such pairs only.
    """
    underflow = _factored_pairs(z, alpha, temperature, scale, out)
    if underflow is None:
        return
    if out.grads.dtype == torch.float32:
        samples = underflow.flatten(1).any(1).nonzero().squeeze(1)  # host sync
        wide = _RenyiBuffers.empty(samples.numel(), *z.shape[1:], torch.float64, z.device, out.targets is not None)
        _pairwise_renyi(z[samples].double(), alpha, temperature, scale, wide)
        out.assign(samples, wide)
    else:
        _recompute_underflowed_pairs(z, alpha, temperature, scale, underflow, out)


def _factors(z: Tensor, alpha: float, temperature: float, pre: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
    """The peer and own factors a_j, s_k (rows×K×C views of ``pre``, rows×2×K×C) and their row shifts (into ``shifts``).

    Z factorises over classes, Z_jk = Σ_c a_jc·s_kc with a_j = e^{α ℓ_j + (1−α) r} and s_k =
    e^{(1−α)(ℓ_k − r)}. The reference r is the cohort's mean logit: when students roughly agree
    (the usual case, confident or not) neither factor peaks where the other is negligible, so Z
    stays far from underflow even for large α. Each factor row is shifted by its maximum; constants
    per row (the log-softmax normaliser among them) cancel in the factors and come back through the
    shifts (:func:`_normaliser_parts`). Made from the raw logits in one pass, then shifted, clamped
    and exponentiated in place.
    """
    rows, _, k, classes = pre.shape
    if k <= _ONE_MATMUL_MAX_K:
        torch.matmul(_factor_matrix(alpha, temperature, k, pre.dtype, z.device), z, out=pre.view(rows, 2 * k, classes))
    else:
        on_logits, on_reference = _factor_weights(alpha, temperature, k, pre.dtype, z.device)
        reference = z.sum(1, keepdim=True).unsqueeze(1)  # rows×1×1×C, K times the mean (the weights divide)
        torch.addcmul(reference * on_reference, on_logits, z.unsqueeze(1), out=pre)
    torch.amax(pre, -1, out=shifts)
    peer, own = _saturating_exp_(pre.sub_(shifts.unsqueeze(-1))).unbind(1)
    return peer, own


def _write_gradients(overlap: Tensor, peer: Tensor, own: Tensor, scale: float, out: _RenyiBuffers) -> None:
    """``out.grads`` (and targets) from the overlaps Z (rows×K×K; consumed, +inf for a pair left out) and the factors.

    The diagonal of Z gives the student's own distribution for free (α ℓ_k + (1−α) ℓ_k = ℓ_k:
    q_k = a_k·s_k / Z_kk), so q_k − T_k = s_k · Σ_j V_jk a_j with V_kk = 1/Z_kk and
    V_jk = −1/((K−1) Z_jk): one division by Z of a fixed K×K matrix, one ``bmm``, and no pass over
    the K×B×C data but the product with s_k.
    """
    k = overlap.shape[1]
    if out.targets is not None:
        peer_weights = torch.div(_pair_weights(k, 0.0, overlap.dtype, overlap.device), overlap)
        torch.bmm(peer_weights.transpose(1, 2), peer, out=out.targets).mul_(own)
    weights = torch.div(_pair_weights(k, scale, overlap.dtype, overlap.device), overlap, out=overlap)  # V·scale
    torch.bmm(weights.transpose(1, 2), peer, out=out.grads).mul_(own)


@functools.lru_cache(maxsize=64)
def _pair_weights(k: int, scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """K×K: ``scale`` on the diagonal, −scale/(K−1) off it (the gradients), or 1/(K−1) off it at scale 0 (the targets)."""
    if scale == 0:
        return off_diagonal_mean_matrix(k, dtype, device)
    weights = torch.full((k, k), -scale / (k - 1), dtype=dtype, device=device)
    return weights.fill_diagonal_(scale)


def _factored_block(
    z: Tensor, alpha: float, temperature: float, scale: float, out: _RenyiBuffers, scratch: tuple[Tensor, Tensor]
) -> None:
    """The usual path: ``out`` for a block of samples from the two factors and two ``bmm``, nothing checked.

    Samples with an underflowing overlap get wrong values here; :func:`_redo_untrusted_samples`
    finds them afterwards from ``out.log_overlap`` and recomputes them. ``scratch`` holds the factors
    and the overlaps.
    """
    factors, overlap = scratch
    peer, own = _factors(z, alpha, temperature, factors, out.shifts)
    torch.bmm(peer, own.transpose(1, 2), out=overlap)  # rows×K(j)×K(k), ≤ C
    torch.log(overlap, out=out.log_overlap)
    _write_gradients(overlap, peer, own, scale, out)


def _trusted_floor(classes: int, dtype: torch.dtype) -> float:
    """Overlaps below C·tiny/eps may have lost terms to the factors' clamped exp: they are not trusted."""
    return classes * torch.finfo(dtype).tiny / torch.finfo(dtype).eps


def _redo_untrusted_samples(by_sample: Tensor, alpha: float, temperature: float, scale: float, out: _RenyiBuffers) -> None:
    """Recompute, by the careful path, the samples (rows of ``by_sample``, B×K×C) with an overlap below the floor.

    One check over all log-overlaps (a host sync); usually no sample needs it.
    """
    log_floor = math.log(_trusted_floor(by_sample.shape[2], out.grads.dtype))
    if out.log_overlap.amin().item() >= log_floor:  # False for NaN too
        return
    samples = (~(out.log_overlap.flatten(1).amin(1) >= log_floor)).nonzero().squeeze(1)  # NaN too
    _redo_samples(by_sample, samples, alpha, temperature, scale, out)


def _redo_samples(by_sample: Tensor, samples: Tensor, alpha: float, temperature: float, scale: float, out: _RenyiBuffers) -> _RenyiBuffers:
    """The rows ``samples`` of ``out`` recomputed by the careful path (:func:`_pairwise_renyi`); returns their buffers."""
    part = _RenyiBuffers.empty(samples.numel(), *by_sample.shape[1:], out.grads.dtype, by_sample.device, out.targets is not None)
    _pairwise_renyi(by_sample[samples].to(out.grads.dtype), alpha, temperature, scale, part)
    out.assign(samples, part)
    return part


def _factored_pairs(z: Tensor, alpha: float, temperature: float, scale: float, out: _RenyiBuffers) -> Tensor | None:
    """Fills ``out`` from two matmuls, checking every overlap; returns the pairs (rows×K×K) whose overlap
    underflowed, None if none did.

    Where Z falls below C·tiny/eps the truncated terms could matter: off the diagonal those pairs
    are flagged and left out; on it, q_k and its normaliser are computed directly.
    """
    dtype = out.grads.dtype
    peer, own = _factors(z, alpha, temperature, torch.empty(z.shape[0], 2, *z.shape[1:], dtype=dtype, device=z.device), out.shifts)
    overlap = torch.bmm(peer, own.transpose(1, 2))  # rows×K(j)×K(k), ≤ C
    accurate = overlap >= _trusted_floor(z.shape[2], dtype)
    torch.log(torch.where(accurate, overlap, 1.0), out=out.log_overlap)
    _write_gradients(torch.where(accurate, overlap, math.inf), peer, own, scale, out)
    # Students far from the cohort: their own distribution directly.
    samples, students = (~accurate.diagonal(dim1=1, dim2=2)).nonzero(as_tuple=True)
    scaled = z[samples, students].to(dtype) / temperature
    peer_shift, own_shift = out.shifts[samples, :, students].unbind(-1)
    out.log_overlap[samples, students, students] = torch.logsumexp(scaled, dim=-1) - peer_shift - own_shift
    out.grads[samples, students] += scaled.softmax(-1) * scale
    underflow = ~accurate
    underflow.diagonal(dim1=1, dim2=2).zero_()
    return underflow if bool(underflow.any()) else None


@functools.lru_cache(maxsize=64)
def _factor_weights(
    alpha: float, temperature: float, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Coefficients (each 2×1×1) of the logits and of their sum over the K students in
    [α ℓ_j + (1−α) r, (1−α)(ℓ_k − r)] / τ, r the mean, up to constants per row (the shifts absorb them).

    Cached: made once per α, not once per block.
    """
    weights = torch.tensor([[alpha, 1 - alpha], [(1 - alpha) / k, (alpha - 1) / k]], dtype=dtype, device=device)
    weights /= temperature
    return weights[0].view(2, 1, 1), weights[1].view(2, 1, 1)


# Cohorts up to this size make both factors' logits with one matmul by a 2K×K matrix (one call
# instead of three); for larger ones its K² multiply-adds per class cost more than the passes it saves.
_ONE_MATMUL_MAX_K = 2


@functools.lru_cache(maxsize=64)
def _factor_matrix(alpha: float, temperature: float, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """2K×K: [α I + (1−α) 11ᵀ/K ; (1−α)(I − 11ᵀ/K)] / τ, the factors' logits from the students' (see :func:`_factors`)."""
    eye = torch.eye(k, dtype=torch.float64)
    mean = torch.full((k, k), 1 / k, dtype=torch.float64)
    matrix = torch.cat([alpha * eye + (1 - alpha) * mean, (1 - alpha) * (eye - mean)]) / temperature
    return matrix.to(dtype=dtype, device=device)


def _recompute_underflowed_pairs(z: Tensor, alpha: float, temperature: float, scale: float, mask: Tensor, out: _RenyiBuffers) -> None:
    """Exact logZ and target share for the (b, j, k) flagged in ``mask`` (rows×K×K), in bounded chunks.

    The factored form left these pairs out; their share is added to ``out.grads`` and
    ``out.targets``, and ``out.log_overlap`` gets the value that makes logZ exact.
    """
    k, classes = z.shape[1:]
    own_lse, peer_part, own_part = _normaliser_parts(out, alpha)
    samples, peers, students = mask.nonzero(as_tuple=True)  # host sync
    chunk = max(1, CHUNK_ELEMENTS // classes)
    for start in range(0, samples.numel(), chunk):
        b, j, s = samples[start : start + chunk], peers[start : start + chunk], students[start : start + chunk]
        peer_logp = z[b, j].to(out.grads.dtype) / temperature - own_lse[b, j, None]
        own_logp = z[b, s].to(out.grads.dtype) / temperature - own_lse[b, s, None]
        mix = torch.add(own_logp.mul_(1 - alpha), peer_logp, alpha=alpha)
        top = mix.amax(-1, keepdim=True)
        weights = _saturating_exp_(mix.sub_(top))
        total = weights.sum(-1, keepdim=True)
        out.log_overlap[b, j, s] = (top + total.log()).squeeze(-1) - peer_part[b, j] - own_part[b, s]
        share = weights.div_(total * (k - 1))
        out.grads.index_put_((b, s), share * -scale, accumulate=True)
        if out.targets is not None:
            out.targets.index_put_((b, s), share, accumulate=True)


def _pairwise_kl(logp: Tensor) -> tuple[Tensor, Tensor]:
    """Targets T_k (the mean of the peers' probabilities) and KL losses averaged over peers."""
    mean_over_peers = off_diagonal_mean_matrix(logp.shape[0], logp.dtype, logp.device)
    probs = logp.exp()
    targets = torch.einsum("jk,jbc->kbc", mean_over_peers, probs)
    neg_entropy = torch.xlogy(probs, probs).sum(-1)  # K×B
    losses = torch.einsum("jk,jb->kb", mean_over_peers, neg_entropy) - (targets * logp).sum(-1)
    return targets, losses.mean(-1)


def log_mean_of_others(logp: Tensor) -> Tensor:
    """log(1/(K−1) Σ_{j≠k} q_j) for every k, from prefix and suffix log-cumulative sums over K.

    Exact in log space (no log(Σ − q_k) cancellation when q_k dominates) and O(K·B·C) memory.
    """
    k = logp.shape[0]
    empty = torch.full_like(logp[:1], -math.inf)
    before = torch.cat([empty, torch.logcumsumexp(logp, dim=0)[:-1]])
    after = torch.cat([torch.logcumsumexp(logp.flip(0), dim=0).flip(0)[1:], empty])
    return torch.logaddexp(before, after) - math.log(k - 1)


def _kl_or_ensemble(logp: Tensor, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Targets and losses from log-probabilities (K×rows×C) for pairwise KL and for the ensemble teacher."""
    if mode == "pairwise":
        return _pairwise_kl(logp)
    teacher_logp = log_mean_of_others(logp)
    losses = renyi_from_log_probs(teacher_logp, logp, alpha).mean(-1)
    targets = torch.softmax(alpha * teacher_logp + (1 - alpha) * logp, dim=-1) if alpha != 1 else teacher_logp.exp()
    return targets, losses


# Rows of the batch per pass of the closed-form path on a CPU: the temporaries of one pass stay in
# its cache (about 1 MiB per K×rows×C tensor) instead of streaming K×B×C tensors through memory.
# On a GPU the whole batch is one pass: there, small kernels would cost more than memory traffic.
_CHUNK_BYTES = 1 << 20


def _rows_per_block(logits: Tensor, compute_dtype: torch.dtype) -> int:
    """Batch rows per pass: about ``_CHUNK_BYTES`` of K×rows×C on a CPU, the whole batch elsewhere."""
    k, batch, classes = logits.shape
    return max(1, _CHUNK_BYTES // (k * classes * compute_dtype.itemsize)) if logits.device.type == "cpu" else batch


def _row_blocks(logits: Tensor, compute_dtype: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
    """The batch rows of each pass and their logits (rows×K×C, in the compute dtype).

    The logits are read by sample: each block is a plain slice when the caller stacked them so.
    """
    rows = _rows_per_block(logits, compute_dtype)
    by_sample = logits.transpose(0, 1)  # B×K×C
    for start in range(0, by_sample.shape[0], rows):
        block = by_sample[start : start + rows] if rows < by_sample.shape[0] else by_sample
        yield slice(start, start + rows), block if block.dtype == compute_dtype else block.to(compute_dtype)


def closed_form_in_row_chunks(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool,
    workspace: MimicryWorkspace | None,
) -> MimicryResult:
    """Rényi/KL targets, gradients and losses, a block of batch rows at a time (targets are per sample).

    The outputs are laid out by sample (B×K×C, returned as K×B×C views), so each block writes a
    contiguous slice (of ``workspace``'s buffers when given).
    """
    k, batch, classes = logits.shape
    if mode == "pairwise" and alpha != 1:
        grads, targets, losses = _pairwise_renyi_in_row_blocks(logits, alpha, temperature, compute_dtype, with_targets, workspace)
    else:
        grads = _empty(workspace, "grads", (batch, k, classes), compute_dtype, logits.device)
        targets = _empty(workspace, "targets", (batch, k, classes), compute_dtype, logits.device) if with_targets else None
        losses = torch.zeros(k, dtype=compute_dtype, device=logits.device)
        for rows, block in _row_blocks(logits, compute_dtype):
            logp = F.log_softmax(block / temperature, dim=-1).transpose(0, 1)  # K×rows×C
            block_targets, block_losses = _kl_or_ensemble(logp, alpha, mode)
            if targets is not None:
                targets[rows] = block_targets.transpose(0, 1)
            torch.sub(logp.exp_(), block_targets, out=grads[rows].transpose(0, 1)).div_(temperature * batch)
            losses.add_(block_losses, alpha=logp.shape[1] / batch)
    return MimicryResult(None if targets is None else targets.transpose(0, 1), grads.transpose(0, 1), losses)


def _pairwise_renyi_in_row_blocks(
    logits: Tensor, alpha: float, temperature: float, dtype: torch.dtype, with_targets: bool, workspace: MimicryWorkspace | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Pairwise Rényi gradients (B×K×C), targets (B×K×C or None) and losses (K): every block by the
    factored form, then the few samples it could not trust by the careful path."""
    k, batch, classes = logits.shape
    scale = 1 / (temperature * batch)
    buffers = _RenyiBuffers.empty(batch, k, classes, dtype, logits.device, with_targets, workspace)
    if native.serves(dtype, logits.device):
        return _pairwise_renyi_compiled(logits, alpha, temperature, scale, buffers, workspace)
    factors, overlaps = _block_scratch(logits, dtype, workspace)
    for rows, block in _row_blocks(logits, dtype):
        if block.shape[0] == batch:  # one block: the whole buffers, no views to make
            _factored_block(block, alpha, temperature, scale, buffers, (factors, overlaps))
        else:
            scratch = factors[: block.shape[0]], overlaps[: block.shape[0]]
            _factored_block(block, alpha, temperature, scale, buffers.rows(rows), scratch)
    _redo_untrusted_samples(logits.transpose(0, 1), alpha, temperature, scale, buffers)
    return buffers.grads, buffers.targets, _pairwise_renyi_losses(buffers, alpha)


def _block_scratch(logits: Tensor, dtype: torch.dtype, workspace: MimicryWorkspace | None) -> tuple[Tensor, Tensor]:
    """A row block's factors (rows×2×K×C) and overlaps (rows×K×K)."""
    k, batch, classes = logits.shape
    rows = min(batch, _rows_per_block(logits, dtype))
    return (
        _empty(workspace, "factors", (rows, 2, k, classes), dtype, logits.device),
        _empty(workspace, "overlaps", (rows, k, k), dtype, logits.device),
    )


def _pairwise_renyi_compiled(
    logits: Tensor, alpha: float, temperature: float, scale: float, buffers: _RenyiBuffers, workspace: MimicryWorkspace | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`_pairwise_renyi_in_row_blocks` by the compiled code (:mod:`rdml_dist.kernels.native`).

    Small samples (K·C) are one call for the whole batch, products included; larger ones are, per
    row block, the compiled passes around torch's two ``bmm``. The samples the compiled code could
    not trust are then redone by the careful path, and their losses added to the others'.
    """
    k, batch, classes = logits.shape
    dtype = buffers.grads.dtype
    loss_sums = _empty(workspace, "loss_sums", (k,), torch.float64, logits.device).zero_()
    flags = _empty(workspace, "untrusted", (batch,), torch.uint8, logits.device)
    trusted_floor = _trusted_floor(classes, dtype)
    by_sample = logits.transpose(0, 1)
    if native.whole_step_serves(k, classes):
        losses = torch.empty(k, dtype=dtype, device=logits.device)
        untrusted = native.step(
            by_sample if by_sample.dtype == dtype else by_sample.to(dtype), alpha, temperature, scale, trusted_floor,
            buffers.grads, buffers.targets, loss_sums, flags, losses,
        )
        if not untrusted:
            return buffers.grads, buffers.targets, losses
    else:
        untrusted = _compiled_passes_in_row_blocks(
            logits, alpha, temperature, scale, trusted_floor, buffers, workspace, loss_sums, flags
        )
    if untrusted:
        redone = _redo_samples(by_sample, flags.nonzero().squeeze(1), alpha, temperature, scale, buffers)
        loss_sums += _pairwise_renyi_loss_sums(redone, alpha)
    return buffers.grads, buffers.targets, _losses_from_sums(loss_sums, alpha, batch, dtype)


def _compiled_passes_in_row_blocks(
    logits: Tensor, alpha: float, temperature: float, scale: float, trusted_floor: float, buffers: _RenyiBuffers,
    workspace: MimicryWorkspace | None, loss_sums: Tensor, flags: Tensor,
) -> int:
    """Per row block: the compiled factors, torch's bmm for the overlaps, the compiled weights, then
    torch's bmm and product with the own factors for the gradients (and targets), as
    :func:`_factored_block`. Flags the untrusted samples in ``flags``; returns how many there are."""
    k, batch, _ = logits.shape
    factors, overlaps = _block_scratch(logits, buffers.grads.dtype, workspace)
    shifts = _empty(workspace, "shifts", (factors.shape[0], 2 * k), factors.dtype, logits.device)
    target_weights = None if buffers.targets is None else _empty(workspace, "target_weights", overlaps.shape, overlaps.dtype, logits.device)
    untrusted = 0
    for rows, block in _row_blocks(logits, buffers.grads.dtype):
        used = block.shape[0]
        out = buffers if used == batch else buffers.rows(rows)
        peer, own = native.factors(block, alpha, temperature, factors[:used], shifts[:used])
        overlap = torch.bmm(peer, own.transpose(1, 2), out=overlaps[:used])
        block_targets = None if target_weights is None else target_weights[:used]
        untrusted += native.weights(
            overlap, shifts[:used], alpha, scale, trusted_floor, block_targets, loss_sums, flags[rows]
        )
        if out.targets is not None:
            torch.bmm(block_targets, peer, out=out.targets).mul_(own)
        torch.bmm(overlap, peer, out=out.grads).mul_(own)
    return untrusted


def stack_by_sample(frames: list[Tensor], device: torch.device, workspace: MimicryWorkspace | None = None) -> Tensor:
    """The K students' B×C logits as the K×B×C float32 view of one B×K×C tensor on ``device``.

    Laid out by sample, so the row blocks of the closed forms are plain slices; with a
    ``workspace`` the stack is written into its buffer (valid until its next use).
    """
    rows, classes = frames[0].shape
    stacked = _empty(workspace, "logits", (rows, len(frames), classes), frames[0].dtype, frames[0].device)
    torch.stack(frames, dim=1, out=stacked)
    if stacked.dtype != torch.float32 or stacked.device != device:
        stacked = stacked.to(device, torch.float32)
    return stacked.transpose(0, 1)


def no_mimicry(logits: Tensor, temperature: float, compute_dtype: torch.dtype, with_targets: bool) -> MimicryResult:
    """Zero gradients and losses (no peer, or Rényi at α = 0); the targets are the students' own distributions."""
    probs = F.softmax(logits.to(compute_dtype) / temperature, dim=-1)
    losses = torch.zeros(logits.shape[0], dtype=compute_dtype, device=logits.device)
    return MimicryResult(probs if with_targets else None, torch.zeros_like(probs), losses)
