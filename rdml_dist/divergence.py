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

This module is the API and the registry; the fast closed-form passes, their buffers and numerics
live in :mod:`rdml_dist.kernels.mimicry`, which a new divergence never needs to read.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rdml_dist.errors import ConfigError
from rdml_dist.factory import is_factory_reference, load_reference
from rdml_dist.kernels.mimicry import (
    CHUNK_ELEMENTS,
    MimicryResult,
    MimicryWorkspace,
    closed_form_in_row_chunks,
    js_from_log_probs,
    kl_from_log_probs,
    log_mean_of_others,
    no_mimicry,
    off_diagonal_mean_matrix,
    renyi_from_log_probs,
    stack_by_sample,
)

__all__ = [
    "DIVERGENCES", "TARGET_MODES", "ClosedForm", "Divergence", "MimicryResult", "MimicryWorkspace", "divergence",
    "js_divergence", "kl_divergence", "mimicry_gradients", "mse_logits", "per_sample_divergence", "register_divergence",
    "renyi_divergence", "resolve_divergence", "stack_by_sample",
]

TARGET_MODES: tuple[str, ...] = ("pairwise", "ensemble")



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


def _ensemble_log_target(scaled: Tensor, definition: Divergence) -> Tensor:
    """Per student, the single teacher made of the *other* students (DML §3.3).

    Probability divergences: log of the mean of the others' probabilities (computed in log
    space). Divergences on logits (``mse_logits``): the mean of the others' scaled logits.
    """
    k = scaled.shape[0]
    if definition.on_logits:
        return torch.einsum("jk,jbc->kbc", off_diagonal_mean_matrix(k, scaled.dtype, scaled.device), scaled)
    return log_mean_of_others(F.log_softmax(scaled, dim=-1))


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
    mean_over_peers = off_diagonal_mean_matrix(k, scaled.dtype, scaled.device)
    losses = torch.zeros(k, dtype=scaled.dtype, device=scaled.device)
    grads = torch.zeros_like(scaled)
    chunk = max(1, CHUNK_ELEMENTS // scaled.numel())
    for start in range(0, k, chunk):
        peers = scaled.detach()[start : start + chunk, None]
        with torch.enable_grad():
            per_pair = per_sample_divergence(definition, peers, inputs[None], alpha)  # chunk×K×B
            chunk_losses = torch.einsum("jk,jkb->kb", mean_over_peers[start : start + chunk], per_pair).mean(-1)
            (chunk_grads,) = torch.autograd.grad(chunk_losses.sum(), inputs)
        losses += chunk_losses.detach()
        grads += chunk_grads
    return losses, grads


def _renyi_closed_form(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool,
    workspace: MimicryWorkspace | None,
) -> MimicryResult:
    if alpha == 0:
        return no_mimicry(logits, temperature, compute_dtype, with_targets)
    return closed_form_in_row_chunks(logits, alpha, temperature, mode, compute_dtype, with_targets, workspace)


def _kl_closed_form(
    logits: Tensor, alpha: float, temperature: float, mode: str, compute_dtype: torch.dtype, with_targets: bool,
    workspace: MimicryWorkspace | None,
) -> MimicryResult:
    return closed_form_in_row_chunks(logits, 1.0, temperature, mode, compute_dtype, with_targets, workspace)


def _mse_of_logits(target_scaled: Tensor, input_scaled: Tensor, alpha: float) -> Tensor:
    return (target_scaled - input_scaled).pow(2).mean(-1)


register_divergence(Divergence("renyi", renyi_from_log_probs, _renyi_closed_form))
register_divergence(Divergence("kl", lambda target, input, alpha: kl_from_log_probs(target, input), _kl_closed_form))
register_divergence(Divergence("js", lambda target, input, alpha: js_from_log_probs(target, input)))
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
        result = no_mimicry(logits, temperature, compute_dtype, with_targets)
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
