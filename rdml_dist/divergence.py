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
    for ``renyi``/``kl`` this is the Rényi mimicry target T_k, a probability distribution.
    """

    targets: Tensor
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
    """KL(p‖q) per sample from log-probabilities; exact zero where p underflows to 0."""
    return torch.xlogy(target_logp.exp(), target_logp.exp()).sum(-1) - (target_logp.exp() * input_logp).sum(-1)


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


def _off_diagonal_mean_matrix(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """K×K matrix M with M[j, k] = 1/(K−1) for j ≠ k: averages over peers by one contraction."""
    return (1 - torch.eye(k, dtype=dtype, device=device)) / (k - 1)


def _pairwise_renyi_exact(logp: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per-sample D[j, k, b] and targets T[k, b, c] from the full K×K×B×C interpolation (slow, always finite)."""
    mix = alpha * logp[:, None] + (1 - alpha) * logp[None, :]
    per_pair = torch.logsumexp(mix, dim=-1) / (alpha - 1)
    mean_over_peers = _off_diagonal_mean_matrix(logp.shape[0], logp.dtype, logp.device)
    targets = torch.einsum("jk,jkbc->kbc", mean_over_peers, torch.softmax(mix, dim=-1))
    return per_pair, targets


def _pairwise_renyi_factored(logp: Tensor, alpha: float) -> tuple[Tensor, Tensor] | None:
    """The same as :func:`_pairwise_renyi_exact` by two batched matmuls, O(K·B·C) memory.

    Σ_c exp(α ℓ_j + (1−α) ℓ_k) factorises into a K×C by C×K product per sample after a
    separate max-shift of each factor. When a pair's distributions barely overlap that product
    underflows; then None is returned and the caller takes the exact path.
    """
    peer_part = alpha * logp
    self_part = (1 - alpha) * logp
    peer_shift = peer_part.amax(dim=-1, keepdim=True)
    self_shift = self_part.amax(dim=-1, keepdim=True)
    peer_factor = (peer_part - peer_shift).exp().transpose(0, 1)  # B×K×C
    self_factor = (self_part - self_shift).exp().transpose(0, 1)  # B×K×C
    overlap = torch.bmm(peer_factor, self_factor.transpose(1, 2))  # B×K(j)×K(k)
    if bool((overlap < torch.finfo(overlap.dtype).tiny / torch.finfo(overlap.dtype).eps).any()):
        return None
    shifts = peer_shift.squeeze(-1).T[:, :, None] + self_shift.squeeze(-1).T[:, None, :]  # B×K×K
    per_pair = (overlap.log() + shifts).permute(1, 2, 0) / (alpha - 1)  # K×K×B
    k = logp.shape[0]
    weights = _off_diagonal_mean_matrix(k, logp.dtype, logp.device)[None] / overlap  # B×K(j)×K(k)
    targets = self_factor * torch.bmm(weights.transpose(1, 2), peer_factor)  # B×K×C
    return per_pair, targets.transpose(0, 1)


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
    factored = _pairwise_renyi_factored(logp, alpha)
    per_pair, targets = factored if factored is not None else _pairwise_renyi_exact(logp, alpha)
    losses = torch.einsum("jk,jkb->kb", mean_over_peers, per_pair)
    return targets, losses.mean(-1)


def _ensemble_log_target(scaled: Tensor, name: str) -> Tensor:
    """Per student, the single teacher made of the *other* students (DML §3.3).

    Probability divergences: log of the mean of the others' probabilities (computed in log
    space). ``mse_logits``: the mean of the others' scaled logits.
    """
    k = scaled.shape[0]
    if name == "mse_logits":
        return torch.einsum("jk,jbc->kbc", _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device), scaled)
    logp = F.log_softmax(scaled, dim=-1)
    others = logp[:, None].expand(k, k, *logp.shape[1:]).clone()
    others[torch.arange(k), torch.arange(k)] = -math.inf
    return torch.logsumexp(others, dim=0) - math.log(k - 1)


def _closed_form(scaled: Tensor, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Targets and losses for Rényi/KL from the closed-form gradient."""
    logp = F.log_softmax(scaled, dim=-1)
    if mode == "pairwise":
        return _pairwise_closed_form(logp, alpha)
    teacher_logp = _ensemble_log_target(scaled, "renyi")
    losses = _renyi_from_log_probs(teacher_logp, logp, alpha).mean(-1)
    targets = torch.softmax(alpha * teacher_logp + (1 - alpha) * logp, dim=-1) if alpha != 1 else teacher_logp.exp()
    return targets, losses


def _autograd_losses_and_grads(scaled: Tensor, name: str, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Losses and ∂loss/∂(scaled logits) for divergences without a closed form here (JS, MSE)."""
    k = scaled.shape[0]
    inputs = scaled.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if mode == "pairwise":
            per_pair = per_sample_divergence(name, scaled.detach()[:, None], inputs[None, :], alpha)  # K×K×B
            mean_over_peers = _off_diagonal_mean_matrix(k, scaled.dtype, scaled.device)
            losses = torch.einsum("jk,jkb->kb", mean_over_peers, per_pair).mean(-1)
        else:
            teacher = _ensemble_log_target(scaled.detach(), name)
            losses = per_sample_divergence(name, teacher, inputs, alpha).mean(-1)
        (grads,) = torch.autograd.grad(losses.sum(), inputs)
    return losses.detach(), grads


def mimicry_gradients(
    logits: Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    mode: str = "pairwise",
    divergence: str = "renyi",
) -> MimicryResult:
    """Mimicry loss, its gradient and target for every student of a cohort in one batched call.

    ``logits`` is K×B×C, one row per student, all on the same batch. Student k's loss is
    ``1/(K−1) Σ_{j≠k} D(q_j ‖ q_k)`` (``pairwise``) or ``D(mean_{j≠k} q_j ‖ q_k)``
    (``ensemble``), batch mean. ``alpha`` is used by ``renyi`` only (α = 0: no mimicry).
    With a single live student there is no peer: losses and gradients are zero.
    """
    _check_divergence(divergence, mode)
    _check_hyperparameters(alpha, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be K×B×C, got shape {tuple(logits.shape)}")
    logits = logits.detach()
    k, batch, _ = logits.shape
    scaled = logits / temperature
    probs = torch.softmax(scaled, dim=-1)
    if k < 2 or (divergence == "renyi" and alpha == 0):
        return MimicryResult(probs, torch.zeros_like(logits), torch.zeros(k, dtype=logits.dtype, device=logits.device))
    if divergence in ("renyi", "kl"):
        targets, losses = _closed_form(scaled, 1.0 if divergence == "kl" else alpha, mode)
        grads = (probs - targets) / (temperature * batch)
        return MimicryResult(targets, grads, losses)
    losses, scaled_grads = _autograd_losses_and_grads(scaled, divergence, alpha, mode)
    grads = scaled_grads / temperature
    return MimicryResult(probs - grads * (temperature * batch), grads, losses)
