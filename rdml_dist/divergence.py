"""The divergences and the cohort mimicry computation: the one place where α is used.

Conventions (DESIGN §1). ``target`` is the peer (held constant), ``input`` the student being
trained; every divergence is D(target ‖ input) of the temperature-softened distributions,
averaged over the batch ("batchmean"). Everything is computed in log space, never by clamping
probabilities, so it stays finite for large α and extreme logits.

The cohort function :func:`mimicry_gradients` returns, for every student at once, the gradient
of its mimicry loss with respect to its own logits. For Rényi and KL it uses the closed form

    ∂ D_α(q_j ‖ q_k) / ∂ z_k = (q_k − w_jk) / τ,    w_jk = softmax(α ℓ_j + (1 − α) ℓ_k)

so a coordinator holding all logits can answer each student with a single B×C tensor.

Each divergence is one registered :class:`Divergence` (its value, and its closed form where it has
one; the others get their gradients from autograd): :data:`DIVERGENCES` maps the built-in names to
them, and ``package.module:name`` names a user's own (see :func:`resolve_divergence`).
"""

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rdml_dist import native_passes
from rdml_dist.errors import ConfigError
from rdml_dist.factory import is_factory_reference, load_reference

TARGET_MODES: tuple[str, ...] = ("pairwise", "ensemble")


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


def _check_hyperparameters(alpha: float, temperature: float) -> None:
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _check_mode(mode: str) -> None:
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown mimicry target mode {mode!r} (allowed: {', '.join(TARGET_MODES)})")


ClosedForm = Callable[[Tensor, float, float, str, torch.dtype, bool, "MimicryWorkspace | None"], MimicryResult]
"""``(logits K×B×C, α, τ, mode, compute dtype, with_targets, workspace)`` → the cohort's result, in the compute
dtype (in the workspace's buffers when one is given)."""


@dataclass(frozen=True)
class Divergence:
    """One divergence D(target ‖ input): all the library needs to use it, defined in one place.

    ``value(target, input, alpha)`` is the per-sample value (shape ``…×B``) from log-probabilities
    (``…×B×C``), or from temperature-scaled logits when ``on_logits``; it must be differentiable in
    ``input``. ``closed_form``, where given, computes the whole cohort at once without autograd; a
    divergence without one gets its gradients by differentiating ``value``, a chunk of peers at a time.
    """

    name: str
    value: Callable[[Tensor, Tensor, float], Tensor]
    closed_form: ClosedForm | None = None
    on_logits: bool = False


DIVERGENCES: dict[str, Divergence] = {}
"""The registered divergences by name: the built-ins, and any added by :func:`register_divergence`."""


def register_divergence(definition: Divergence) -> Divergence:
    """Make ``definition`` available by its name (a taken name is refused); returns it."""
    if not definition.name or ":" in definition.name:
        raise ValueError(f"a divergence name must be non-empty and without ':', got {definition.name!r}")
    if definition.name in DIVERGENCES:
        raise ValueError(f"a divergence named {definition.name!r} is already registered")
    DIVERGENCES[definition.name] = definition
    return definition


def resolve_divergence(name: "str | Divergence", field: str = "divergence") -> Divergence:
    """The registered divergence ``name``, or the :class:`Divergence` that ``package.module:attribute`` names.

    A user's own divergence lives in a module beside the config (or anywhere importable) and is
    named by reference, so every process of a cohort (a Ray coordinator among them) finds it by
    importing the module. Raises ConfigError (a ValueError) naming ``field`` when it is neither.
    """
    if isinstance(name, Divergence):
        return name
    if is_factory_reference(name):
        definition = load_reference(name, field)
        if not isinstance(definition, Divergence):
            raise ConfigError(field, f"{name!r} is a {type(definition).__name__}, not a rdml_dist.divergence.Divergence")
        return definition
    if name not in DIVERGENCES:
        raise ConfigError(
            field, f"unknown divergence {name!r} (registered: {', '.join(DIVERGENCES)}; or 'package.module:name' for your own)"
        )
    return DIVERGENCES[name]


def _kl_from_log_probs(target_logp: Tensor, input_logp: Tensor) -> Tensor:
    """KL(p‖q) per sample from log-probabilities.

    Terms where p underflows to 0 are exactly zero, and so is their gradient (``xlogy(p, p)`` would
    give 0/0 = NaN there under autograd, e.g. in JS for very confident students).
    """
    target_probs = target_logp.exp()
    return (target_probs * torch.where(target_probs > 0, target_logp - input_logp, 0.0)).sum(-1)


def _renyi_from_log_probs(target_logp: Tensor, input_logp: Tensor, alpha: float) -> Tensor:
    """D_α(p‖q) per sample via logsumexp(α ℓ_p + (1−α) ℓ_q) / (α − 1), with the α ∈ {0, 1} limits."""
    if alpha == 0:
        return torch.zeros(target_logp.shape[:-1], dtype=target_logp.dtype, device=target_logp.device)
    if alpha == 1:
        return _kl_from_log_probs(target_logp, input_logp)
    return torch.logsumexp(alpha * target_logp + (1 - alpha) * input_logp, dim=-1) / (alpha - 1)


def _js_from_log_probs(target_logp: Tensor, input_logp: Tensor) -> Tensor:
    """Jensen–Shannon divergence per sample: ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2."""
    log_mixture = torch.logsumexp(torch.stack(torch.broadcast_tensors(target_logp, input_logp)), dim=0) - math.log(2)
    return 0.5 * (_kl_from_log_probs(target_logp, log_mixture) + _kl_from_log_probs(input_logp, log_mixture))


def per_sample_divergence(
    name: "str | Divergence", target_scaled: Tensor, input_scaled: Tensor, alpha: float = 1.0
) -> Tensor:
    """Divergence per sample (shape ``…×B``) between temperature-scaled logits ``z/τ`` (``…×B×C``).

    Probability divergences apply log_softmax first, so a log-probability vector is a valid
    ``target_scaled`` too; one defined ``on_logits`` (``mse_logits``) gets the scaled logits as they are.
    """
    definition = resolve_divergence(name)
    if definition.on_logits:
        return definition.value(target_scaled, input_scaled, alpha)
    return definition.value(F.log_softmax(target_scaled, dim=-1), F.log_softmax(input_scaled, dim=-1), alpha)


def divergence(
    name: "str | Divergence", target_logits: Tensor, input_logits: Tensor, *, alpha: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """D(softmax(target/τ) ‖ softmax(input/τ)) averaged over the batch, as a differentiable scalar.

    Nothing is detached: in mutual learning pass ``target_logits.detach()`` (the peer is a
    constant target).
    """
    definition = resolve_divergence(name)
    _check_hyperparameters(alpha, temperature)
    if target_logits.shape != input_logits.shape:
        raise ValueError(f"target shape {tuple(target_logits.shape)} != input shape {tuple(input_logits.shape)}")
    return per_sample_divergence(definition, target_logits / temperature, input_logits / temperature, alpha).mean()


def renyi_divergence(target_logits: Tensor, input_logits: Tensor, alpha: float, temperature: float = 1.0) -> Tensor:
    """D_α(softmax(target/τ) ‖ softmax(input/τ)), batch mean: exact KL at α = 1, zero at α = 0."""
    return divergence("renyi", target_logits, input_logits, alpha=alpha, temperature=temperature)


def kl_divergence(target_logits: Tensor, input_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(target/τ) ‖ softmax(input/τ)), batch mean (the target is the first argument)."""
    return divergence("kl", target_logits, input_logits, temperature=temperature)


def js_divergence(target_logits: Tensor, input_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen–Shannon divergence of the softened distributions, batch mean."""
    return divergence("js", target_logits, input_logits, temperature=temperature)


def mse_logits(target_logits: Tensor, input_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared difference of the logits divided by τ (so that τ²·value is the raw-logit MSE)."""
    return divergence("mse_logits", target_logits, input_logits, temperature=temperature)


# Upper bound on the elements of one temporary chunk (exactly recomputed pairs, peers of the generic
# path): peak memory stays O(K·B·C) plus this, whatever the cohort size.
_CHUNK_ELEMENTS = 1 << 16


def _off_diagonal_mean_matrix(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
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
        return _off_diagonal_mean_matrix(k, dtype, device)
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
    chunk = max(1, _CHUNK_ELEMENTS // classes)
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
    mean_over_peers = _off_diagonal_mean_matrix(logp.shape[0], logp.dtype, logp.device)
    probs = logp.exp()
    targets = torch.einsum("jk,jbc->kbc", mean_over_peers, probs)
    neg_entropy = torch.xlogy(probs, probs).sum(-1)  # K×B
    losses = torch.einsum("jk,jb->kb", mean_over_peers, neg_entropy) - (targets * logp).sum(-1)
    return targets, losses.mean(-1)


def _log_mean_of_others(logp: Tensor) -> Tensor:
    """log(1/(K−1) Σ_{j≠k} q_j) for every k, from prefix and suffix log-cumulative sums over K.

    Exact in log space (no log(Σ − q_k) cancellation when q_k dominates) and O(K·B·C) memory.
    """
    k = logp.shape[0]
    empty = torch.full_like(logp[:1], -math.inf)
    before = torch.cat([empty, torch.logcumsumexp(logp, dim=0)[:-1]])
    after = torch.cat([torch.logcumsumexp(logp.flip(0), dim=0).flip(0)[1:], empty])
    return torch.logaddexp(before, after) - math.log(k - 1)


def _ensemble_log_target(scaled: Tensor, definition: Divergence) -> Tensor:
    """Per student, the single teacher made of the *other* students (DML §3.3).

    Probability divergences: log of the mean of the others' probabilities (computed in log
    space). Divergences on logits (``mse_logits``): the mean of the others' scaled logits.
    """
    k = scaled.shape[0]
    if definition.on_logits:
        return torch.einsum("jk,jbc->kbc", _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device), scaled)
    return _log_mean_of_others(F.log_softmax(scaled, dim=-1))


def _kl_or_ensemble(logp: Tensor, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Targets and losses from log-probabilities (K×rows×C) for pairwise KL and for the ensemble teacher."""
    if mode == "pairwise":
        return _pairwise_kl(logp)
    teacher_logp = _log_mean_of_others(logp)
    losses = _renyi_from_log_probs(teacher_logp, logp, alpha).mean(-1)
    targets = torch.softmax(alpha * teacher_logp + (1 - alpha) * logp, dim=-1) if alpha != 1 else teacher_logp.exp()
    return targets, losses


def _autograd_losses_and_grads(scaled: Tensor, definition: Divergence, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Losses and ∂loss/∂(scaled logits) for divergences without a closed form (JS, MSE, a user's own).

    Pairwise, the peers are taken a chunk at a time (one backward each), so no K×K×B×C tensor exists.
    """
    k = scaled.shape[0]
    inputs = scaled.detach().clone().requires_grad_(True)
    if mode == "ensemble":
        teacher = _ensemble_log_target(scaled.detach(), definition)
        with torch.enable_grad():
            losses = per_sample_divergence(definition, teacher, inputs, alpha).mean(-1)
            (grads,) = torch.autograd.grad(losses.sum(), inputs)
        return losses.detach(), grads
    mean_over_peers = _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device)
    losses = torch.zeros(k, dtype=scaled.dtype, device=scaled.device)
    grads = torch.zeros_like(scaled)
    chunk = max(1, _CHUNK_ELEMENTS // scaled.numel())
    for start in range(0, k, chunk):
        peers = scaled.detach()[start : start + chunk, None]
        with torch.enable_grad():
            per_pair = per_sample_divergence(definition, peers, inputs[None], alpha)  # chunk×K×B
            chunk_losses = torch.einsum("jk,jkb->kb", mean_over_peers[start : start + chunk], per_pair).mean(-1)
            (chunk_grads,) = torch.autograd.grad(chunk_losses.sum(), inputs)
        losses += chunk_losses.detach()
        grads += chunk_grads
    return losses, grads


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


def _closed_form_in_row_chunks(
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
    if native_passes.serves(dtype, logits.device):
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
    """:func:`_pairwise_renyi_in_row_blocks` by the compiled code (:mod:`rdml_dist.native_passes`).

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
    if native_passes.whole_step_serves(k, classes):
        losses = torch.empty(k, dtype=dtype, device=logits.device)
        untrusted = native_passes.step(
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
        peer, own = native_passes.factors(block, alpha, temperature, factors[:used], shifts[:used])
        overlap = torch.bmm(peer, own.transpose(1, 2), out=overlaps[:used])
        block_targets = None if target_weights is None else target_weights[:used]
        untrusted += native_passes.weights(
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


def _no_mimicry(logits: Tensor, temperature: float, compute_dtype: torch.dtype, with_targets: bool) -> MimicryResult:
    """Zero gradients and losses (no peer, or Rényi at α = 0); the targets are the students' own distributions."""
    probs = F.softmax(logits.to(compute_dtype) / temperature, dim=-1)
    losses = torch.zeros(logits.shape[0], dtype=compute_dtype, device=logits.device)
    return MimicryResult(probs if with_targets else None, torch.zeros_like(probs), losses)


def _renyi_closed_form(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool,
    workspace: MimicryWorkspace | None,
) -> MimicryResult:
    if alpha == 0:
        return _no_mimicry(logits, temperature, compute_dtype, with_targets)
    return _closed_form_in_row_chunks(logits, alpha, temperature, mode, compute_dtype, with_targets, workspace)


def _kl_closed_form(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool,
    workspace: MimicryWorkspace | None,
) -> MimicryResult:
    return _closed_form_in_row_chunks(logits, 1.0, temperature, mode, compute_dtype, with_targets, workspace)


def _mse_of_logits(target_scaled: Tensor, input_scaled: Tensor, alpha: float) -> Tensor:
    return (target_scaled - input_scaled).pow(2).mean(-1)


register_divergence(Divergence("renyi", _renyi_from_log_probs, _renyi_closed_form))
register_divergence(Divergence("kl", lambda target, input, alpha: _kl_from_log_probs(target, input), _kl_closed_form))
register_divergence(Divergence("js", lambda target, input, alpha: _js_from_log_probs(target, input)))
register_divergence(Divergence("mse_logits", _mse_of_logits, on_logits=True))


def mimicry_gradients(
    logits: Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    mode: str = "pairwise",
    divergence: "str | Divergence" = "renyi",
    with_targets: bool = True,
    workspace: "MimicryWorkspace | None" = None,
) -> MimicryResult:
    """Mimicry loss, its gradient and target for every student of a cohort in one batched call.

    ``logits`` is K×B×C, one row per student, all on the same batch. Student k's loss is
    ``1/(K−1) Σ_{j≠k} D(q_j ‖ q_k)`` (``pairwise``) or ``D(mean_{j≠k} q_j ‖ q_k)``
    (``ensemble``), batch mean. ``divergence`` is a registered name, ``package.module:name`` or a
    :class:`Divergence`. ``alpha`` is used by ``renyi`` only (α = 0: no mimicry).
    With a single live student there is no peer: losses and gradients are zero.
    ``with_targets=False`` skips writing the K×B×C targets (``targets`` is then None). With a
    ``workspace`` the closed forms write into its buffers: the result is valid until its next use.
    """
    definition = resolve_divergence(divergence)
    _check_mode(mode)
    _check_hyperparameters(alpha, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be K×B×C, got shape {tuple(logits.shape)}")
    logits = logits.detach()
    k, batch, _ = logits.shape
    if batch == 0:  # a coordinator shard's part of a batch with fewer rows than shards: nothing to average
        empty = torch.zeros_like(logits)
        return MimicryResult(empty if with_targets else None, empty, torch.zeros(k, dtype=logits.dtype, device=logits.device))
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # half-precision range is too narrow
    if k < 2:
        result = _no_mimicry(logits, temperature, compute_dtype, with_targets)
    elif definition.closed_form is not None:
        result = definition.closed_form(logits, alpha, temperature, mode, compute_dtype, with_targets, workspace)
    else:
        scaled = logits.to(compute_dtype) / temperature
        losses, scaled_grads = _autograd_losses_and_grads(scaled, definition, alpha, mode)
        grads = scaled_grads / temperature
        targets = F.softmax(scaled, dim=-1) - grads * (temperature * batch) if with_targets else None
        result = MimicryResult(targets, grads, losses)
    if compute_dtype == logits.dtype:
        return result
    return MimicryResult(*(None if tensor is None else tensor.to(logits.dtype) for tensor in result))
