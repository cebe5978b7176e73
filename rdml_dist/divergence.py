"""The divergences and the cohort mimicry computation: the one place where α is used.

Conventions (DESIGN §1). ``target`` is the peer (held constant), ``input`` the student being
trained; every divergence is D(target ‖ input) of the temperature-softened distributions,
averaged over the batch ("batchmean"). Everything is computed in log space, never by clamping
probabilities, so it stays finite for large α and extreme logits.

The cohort function :func:`mimicry_gradients` returns, for every student at once, the gradient
of its mimicry loss with respect to its own logits. For Rényi and KL it uses the closed form

    ∂ D_α(q_j ‖ q_k) / ∂ z_k = (q_k − w_jk) / τ,    w_jk = softmax(α ℓ_j + (1 − α) ℓ_k)

so a coordinator holding all logits can answer each student with a single B×C tensor.
"""

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DivergenceName = Literal["renyi", "kl", "js", "mse_logits"]
TargetMode = Literal["pairwise", "ensemble"]
DIVERGENCES: tuple[str, ...] = ("renyi", "kl", "js", "mse_logits")
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


def _check_divergence(name: str, mode: str = "pairwise") -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r} (allowed: {', '.join(DIVERGENCES)})")
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown mimicry target mode {mode!r} (allowed: {', '.join(TARGET_MODES)})")


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


def per_sample_divergence(name: str, target_scaled: Tensor, input_scaled: Tensor, alpha: float = 1.0) -> Tensor:
    """Divergence per sample (shape ``…×B``) between temperature-scaled logits ``z/τ`` (``…×B×C``).

    Probability divergences apply log_softmax first, so a log-probability vector is a valid
    ``target_scaled`` too; ``mse_logits`` is the mean over classes of the squared difference.
    """
    if name == "mse_logits":
        return (target_scaled - input_scaled).pow(2).mean(-1)
    target_logp = F.log_softmax(target_scaled, dim=-1)
    input_logp = F.log_softmax(input_scaled, dim=-1)
    if name == "renyi":
        return _renyi_from_log_probs(target_logp, input_logp, alpha)
    if name == "kl":
        return _kl_from_log_probs(target_logp, input_logp)
    if name == "js":
        return _js_from_log_probs(target_logp, input_logp)
    raise ValueError(f"unknown divergence {name!r} (allowed: {', '.join(DIVERGENCES)})")


def divergence(
    name: str, target_logits: Tensor, input_logits: Tensor, *, alpha: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """D(softmax(target/τ) ‖ softmax(input/τ)) averaged over the batch, as a differentiable scalar.

    Nothing is detached: in mutual learning pass ``target_logits.detach()`` (the peer is a
    constant target).
    """
    _check_divergence(name)
    _check_hyperparameters(alpha, temperature)
    if target_logits.shape != input_logits.shape:
        raise ValueError(f"target shape {tuple(target_logits.shape)} != input shape {tuple(input_logits.shape)}")
    return per_sample_divergence(name, target_logits / temperature, input_logits / temperature, alpha).mean()


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

    Subnormal or zero results make exp an order of magnitude slower on CPUs (confident students
    produce many), and where this is used such terms are negligible by construction.
    """
    return x.clamp_(min=math.log(torch.finfo(x.dtype).tiny) + 1).exp_()


def _pairwise_renyi(logp: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Log-normalisers logZ[b, j, k] = logsumexp_c(α ℓ_j + (1−α) ℓ_k) and targets T[b, k, c] of all pairs.

    The factored matmul form (:func:`_factored_pairs`) serves almost every pair. In float32 the
    samples where some pair's overlap underflows are redone in float64, whose exponent range is
    ten times wider; the pairs that underflow even there (peers with essentially disjoint support)
    are recomputed exactly. So the cost grows with the number of such pairs only.
    """
    log_norm, targets, underflow = _factored_pairs(logp, alpha)
    if logp.dtype == torch.float32:
        samples = underflow.flatten(1).any(1).nonzero().squeeze(1)  # host sync
        if samples.numel():
            wide_norm, wide_targets = _pairwise_renyi(logp[:, samples].double(), alpha)
            log_norm[samples], targets[samples] = wide_norm.float(), wide_targets.float()
    else:
        _recompute_underflowed_pairs(logp, alpha, underflow, log_norm, targets)
    return log_norm, targets


def _factored_pairs(logp: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """logZ (B×K×K), targets (B×K×C) and the pairs (B×K×K) where the factored form underflowed.

    Z factorises over classes, Σ_c a_jc·s_kc, so all K² pairs of a sample come from one matmul and
    the targets T_k = 1/(K−1) Σ_{j≠k} s_k·a_j / Z_jk from a second: O(K²·B·C) multiply-adds inside
    ``bmm`` and O(K·B·C) memory. The factors are taken relative to the cohort's mean log-probability
    r, a_j = exp(r + α(ℓ_j − r) − max) and s_k = exp((1−α)(ℓ_k − r) − max): their product is the
    same, but when the students roughly agree (the usual case, confident or not) neither factor
    peaks where the other is negligible, so Z stays far from underflow even for large α. Where Z
    falls below C·tiny/eps the truncated terms could matter: those pairs are flagged, left out of
    the targets and given a placeholder logZ.
    """
    k, _, classes = logp.shape
    by_sample = logp.transpose(0, 1)  # B×K×C view
    reference = by_sample.mean(1, keepdim=True)  # B×1×C
    deviation = by_sample - reference
    peer = torch.add(reference, deviation, alpha=alpha)  # α ℓ_j + (1−α) r
    peer_shift = peer.amax(-1, keepdim=True)
    peer = _saturating_exp_(peer.sub_(peer_shift))
    extreme = deviation.amax(-1, keepdim=True) if alpha < 1 else deviation.amin(-1, keepdim=True)
    own_shift = (1 - alpha) * extreme  # max over classes of (1−α)(ℓ_k − r)
    own = _saturating_exp_(torch.add(-own_shift, deviation, alpha=1 - alpha, out=deviation))  # one pass, in place
    overlap = torch.bmm(peer, own.transpose(1, 2))  # B×K(j)×K(k), ≤ C
    floor = classes * torch.finfo(logp.dtype).tiny / torch.finfo(logp.dtype).eps
    pairs = ~torch.eye(k, dtype=torch.bool, device=logp.device)
    accurate = pairs & (overlap >= floor)
    overlap = torch.where(accurate, overlap, 1.0)
    log_norm = overlap.log() + peer_shift + own_shift.transpose(1, 2)
    weights = torch.where(accurate, 1 / ((k - 1) * overlap), 0.0)
    targets = torch.bmm(weights.transpose(1, 2), peer).mul_(own)
    return log_norm, targets, pairs & ~accurate


def _recompute_underflowed_pairs(logp: Tensor, alpha: float, mask: Tensor, log_norm: Tensor, targets: Tensor) -> None:
    """Exact logZ and target share for the (b, j, k) flagged in ``mask`` (B×K×K), in bounded chunks.

    Writes ``log_norm`` (B×K×K) and adds to ``targets`` (B×K×C) in place.
    """
    k, batch, classes = logp.shape
    samples, peers, students = mask.nonzero(as_tuple=True)  # host sync
    rows = logp.reshape(-1, classes)  # row j·B + b
    target_rows = targets.view(-1, classes)  # row b·K + k
    chunk = max(1, _CHUNK_ELEMENTS // classes)
    for start in range(0, samples.numel(), chunk):
        b, j, s = samples[start : start + chunk], peers[start : start + chunk], students[start : start + chunk]
        mix = torch.add(rows.index_select(0, s * batch + b).mul_(1 - alpha), rows.index_select(0, j * batch + b), alpha=alpha)
        top = mix.amax(-1, keepdim=True)
        weights = _saturating_exp_(mix.sub_(top))
        total = weights.sum(-1, keepdim=True)
        log_norm[b, j, s] = (top + total.log()).squeeze(-1)
        target_rows.index_add_(0, b * k + s, weights.div_(total * (k - 1)))


def _pairwise_closed_form(logp: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Targets T_k and losses for Rényi (KL at α = 1) averaged over peers."""
    k = logp.shape[0]
    mean_over_peers = _off_diagonal_mean_matrix(k, logp.dtype, logp.device)
    if alpha == 1:
        probs = logp.exp()
        targets = torch.einsum("jk,jbc->kbc", mean_over_peers, probs)
        neg_entropy = torch.xlogy(probs, probs).sum(-1)  # K×B
        losses = torch.einsum("jk,jb->kb", mean_over_peers, neg_entropy) - (targets * logp).sum(-1)
        return targets, losses.mean(-1)
    log_norm, targets = _pairwise_renyi(logp, alpha)
    losses = torch.einsum("jk,bjk->k", mean_over_peers, log_norm) / ((alpha - 1) * logp.shape[1])
    return targets.transpose(0, 1), losses


def _log_mean_of_others(logp: Tensor) -> Tensor:
    """log(1/(K−1) Σ_{j≠k} q_j) for every k, from prefix and suffix log-cumulative sums over K.

    Exact in log space (no log(Σ − q_k) cancellation when q_k dominates) and O(K·B·C) memory.
    """
    k = logp.shape[0]
    empty = torch.full_like(logp[:1], -math.inf)
    before = torch.cat([empty, torch.logcumsumexp(logp, dim=0)[:-1]])
    after = torch.cat([torch.logcumsumexp(logp.flip(0), dim=0).flip(0)[1:], empty])
    return torch.logaddexp(before, after) - math.log(k - 1)


def _ensemble_log_target(scaled: Tensor, name: str) -> Tensor:
    """Per student, the single teacher made of the *other* students (DML §3.3).

    Probability divergences: log of the mean of the others' probabilities (computed in log
    space). ``mse_logits``: the mean of the others' scaled logits.
    """
    k = scaled.shape[0]
    if name == "mse_logits":
        return torch.einsum("jk,jbc->kbc", _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device), scaled)
    return _log_mean_of_others(F.log_softmax(scaled, dim=-1))


def _closed_form(logp: Tensor, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Targets and losses for Rényi/KL from the closed-form gradient."""
    if mode == "pairwise":
        return _pairwise_closed_form(logp, alpha)
    teacher_logp = _log_mean_of_others(logp)
    losses = _renyi_from_log_probs(teacher_logp, logp, alpha).mean(-1)
    targets = torch.softmax(alpha * teacher_logp + (1 - alpha) * logp, dim=-1) if alpha != 1 else teacher_logp.exp()
    return targets, losses


def _autograd_losses_and_grads(scaled: Tensor, name: str, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Losses and ∂loss/∂(scaled logits) for divergences without a closed form here (JS, MSE).

    Pairwise, the peers are taken a chunk at a time (one backward each), so no K×K×B×C tensor exists.
    """
    k = scaled.shape[0]
    inputs = scaled.detach().clone().requires_grad_(True)
    if mode == "ensemble":
        teacher = _ensemble_log_target(scaled.detach(), name)
        with torch.enable_grad():
            losses = per_sample_divergence(name, teacher, inputs, alpha).mean(-1)
            (grads,) = torch.autograd.grad(losses.sum(), inputs)
        return losses.detach(), grads
    mean_over_peers = _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device)
    losses = torch.zeros(k, dtype=scaled.dtype, device=scaled.device)
    grads = torch.zeros_like(scaled)
    chunk = max(1, _CHUNK_ELEMENTS // scaled.numel())
    for start in range(0, k, chunk):
        peers = scaled.detach()[start : start + chunk, None]
        with torch.enable_grad():
            per_pair = per_sample_divergence(name, peers, inputs[None], alpha)  # chunk×K×B
            chunk_losses = torch.einsum("jk,jkb->kb", mean_over_peers[start : start + chunk], per_pair).mean(-1)
            (chunk_grads,) = torch.autograd.grad(chunk_losses.sum(), inputs)
        losses += chunk_losses.detach()
        grads += chunk_grads
    return losses, grads


# Rows of the batch per pass of the closed-form path: the K×rows×C temporaries of one pass stay
# in the CPU's cache (about 1 MiB each) instead of streaming K×B×C tensors through memory a dozen times.
_CHUNK_BYTES = 1 << 20


def _closed_form_in_row_chunks(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool
) -> MimicryResult:
    """Rényi/KL targets, gradients and losses, a block of batch rows at a time (targets are per sample).

    Each block is copied once into a contiguous rows×K×C layout, which every later pass reads with
    unit stride; its batch-mean losses are weighted by its share of the rows. The outputs are
    laid out by sample too and returned as K×B×C views.
    """
    k, batch, classes = logits.shape
    rows = max(1, _CHUNK_BYTES // (k * classes * compute_dtype.itemsize))
    grads = torch.empty(batch, k, classes, dtype=compute_dtype, device=logits.device)
    targets = torch.empty_like(grads) if with_targets else None
    losses = torch.zeros(k, dtype=compute_dtype, device=logits.device)
    by_sample = logits.transpose(0, 1)  # B×K×C: each block a plain slice when the caller stacked the logits by sample
    for start in range(0, batch, rows):
        block = by_sample[start : start + rows].to(compute_dtype)
        if temperature != 1:
            block = block / temperature
        logp = F.log_softmax(block.contiguous(), dim=-1).transpose(0, 1)  # K×rows×C view of a rows×K×C tensor
        block_targets, block_losses = _closed_form(logp, alpha, mode)
        if targets is not None:
            targets[start : start + rows] = block_targets.transpose(0, 1)
        block_grads = grads[start : start + rows].transpose(0, 1)
        torch.sub(logp.exp_(), block_targets, out=block_grads).div_(temperature * batch)  # logp is done with: q in place
        losses.add_(block_losses, alpha=logp.shape[1] / batch)
    return MimicryResult(None if targets is None else targets.transpose(0, 1), grads.transpose(0, 1), losses)


def mimicry_gradients(
    logits: Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    mode: str = "pairwise",
    divergence: str = "renyi",
    with_targets: bool = True,
) -> MimicryResult:
    """Mimicry loss, its gradient and target for every student of a cohort in one batched call.

    ``logits`` is K×B×C, one row per student, all on the same batch. Student k's loss is
    ``1/(K−1) Σ_{j≠k} D(q_j ‖ q_k)`` (``pairwise``) or ``D(mean_{j≠k} q_j ‖ q_k)``
    (``ensemble``), batch mean. ``alpha`` is used by ``renyi`` only (α = 0: no mimicry).
    With a single live student there is no peer: losses and gradients are zero.
    ``with_targets=False`` skips writing the K×B×C targets (``targets`` is then None).
    """
    _check_divergence(divergence, mode)
    _check_hyperparameters(alpha, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be K×B×C, got shape {tuple(logits.shape)}")
    logits = logits.detach()
    k, batch, _ = logits.shape
    if batch == 0:  # a coordinator shard's part of a batch with fewer rows than shards: nothing to average
        empty = torch.zeros_like(logits)
        return MimicryResult(empty if with_targets else None, empty, torch.zeros(k, dtype=logits.dtype, device=logits.device))
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # half-precision range is too narrow
    if k >= 2 and divergence in ("renyi", "kl") and not (divergence == "renyi" and alpha == 0):
        result = _closed_form_in_row_chunks(logits, 1.0 if divergence == "kl" else alpha, temperature, mode, compute_dtype, with_targets)
        return MimicryResult(*(None if tensor is None else tensor.to(logits.dtype) for tensor in result))
    scaled = logits.to(compute_dtype) / temperature
    probs = F.softmax(scaled, dim=-1)
    if k < 2 or divergence == "renyi":  # no peer, or α = 0: no mimicry
        targets, grads, losses = probs, torch.zeros_like(probs), torch.zeros(k, dtype=compute_dtype, device=logits.device)
    else:
        losses, scaled_grads = _autograd_losses_and_grads(scaled, divergence, alpha, mode)
        grads = scaled_grads / temperature
        targets = probs - grads * (temperature * batch)
    return MimicryResult(None if not with_targets else targets.to(logits.dtype), grads.to(logits.dtype), losses.to(logits.dtype))
