"""The divergence math against independent naive formulas (float64) and its numerical limits."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rdml_dist.divergence import (
    divergence,
    js_divergence,
    kl_divergence,
    mimicry_gradients,
    mse_logits,
    renyi_divergence,
)
from rdml_dist.divergence import _pairwise_renyi_exact, _pairwise_renyi_factored


def naive_per_sample(name: str, target: torch.Tensor, inp: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """Textbook formulas in probability space; only valid for moderate logits."""
    if name == "mse_logits":
        return ((target - inp) / tau).pow(2).mean(-1)
    p, q = torch.softmax(target / tau, -1), torch.softmax(inp / tau, -1)
    return naive_prob_divergence(name, p, q, alpha)


def naive_prob_divergence(name: str, p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    if name == "kl" or (name == "renyi" and alpha == 1):
        return (p * (p / q).log()).sum(-1)
    if name == "renyi":
        return (p.pow(alpha) * q.pow(1 - alpha)).sum(-1).log() / (alpha - 1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def naive_cohort_loss(name: str, logits: torch.Tensor, k: int, alpha: float, tau: float, mode: str) -> torch.Tensor:
    """Student k's mimicry loss with its own logits differentiable and the peers constant."""
    peers = [j for j in range(logits.shape[0]) if j != k]
    z_k = logits[k]
    if mode == "pairwise":
        return torch.stack([naive_per_sample(name, logits[j].detach(), z_k, alpha, tau).mean() for j in peers]).mean()
    if name == "mse_logits":
        teacher = torch.stack([logits[j].detach() for j in peers]).mean(0)
        return naive_per_sample(name, teacher, z_k, alpha, tau).mean()
    teacher_p = torch.stack([torch.softmax(logits[j].detach() / tau, -1) for j in peers]).mean(0)
    return naive_prob_divergence(name, teacher_p, torch.softmax(z_k / tau, -1), alpha).mean()


def random_logits(k: int, b: int = 6, c: int = 5, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("alpha,tau,k", list(itertools.product([0.3, 0.5, 1.0, 2.0, 5.0], [1.0, 4.0], [2, 3, 5])))
def test_renyi_cohort_gradients_match_autograd(alpha: float, tau: float, k: int, mode: str) -> None:
    logits = random_logits(k, seed=k)
    result = mimicry_gradients(logits, alpha=alpha, temperature=tau, mode=mode)
    for student in range(k):
        leaf = logits.clone().requires_grad_(True)
        loss = naive_cohort_loss("renyi", leaf, student, alpha, tau, mode)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.allclose(result.losses[student], loss.detach(), rtol=1e-9, atol=1e-12)
        relative_error = (result.grads[student] - grad[student]).norm() / grad[student].norm()
        assert relative_error <= 1e-6, (student, float(relative_error))


@pytest.mark.parametrize("name", ["kl", "js", "mse_logits"])
@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("tau,k", [(1.0, 2), (4.0, 3), (2.0, 5)])
def test_other_divergences_cohort_gradients_match_autograd(name: str, mode: str, tau: float, k: int) -> None:
    logits = random_logits(k, seed=10 + k)
    result = mimicry_gradients(logits, temperature=tau, mode=mode, divergence=name)
    for student in range(k):
        leaf = logits.clone().requires_grad_(True)
        loss = naive_cohort_loss(name, leaf, student, 1.0, tau, mode)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.allclose(result.losses[student], loss.detach(), rtol=1e-9, atol=1e-12)
        assert (result.grads[student] - grad[student]).norm() / grad[student].norm() <= 1e-6


def test_renyi_targets_are_distributions_and_reduce_to_peer_mean_at_alpha_one() -> None:
    logits = random_logits(4)
    for alpha in (0.5, 2.0):
        targets = mimicry_gradients(logits, alpha=alpha).targets
        assert torch.all(targets >= 0)
        assert torch.allclose(targets.sum(-1), torch.ones(4, 6, dtype=torch.float64))
    probs = torch.softmax(logits, -1)
    at_one = mimicry_gradients(logits, alpha=1.0).targets
    assert torch.allclose(at_one[0], probs[1:].mean(0))
    assert torch.allclose(at_one[2], probs[[0, 1, 3]].mean(0))


def test_orders_beside_one_meet_the_kl_branch_and_alpha_zero_is_no_mimicry() -> None:
    """α = 1 takes the KL branch, orders just beside it the Rényi formula: two code paths that must meet."""
    logits = random_logits(3)
    at_one = mimicry_gradients(logits, alpha=1.0)
    for alpha in (1 - 1e-5, 1 + 1e-5):
        beside = mimicry_gradients(logits, alpha=alpha)
        assert (beside.grads - at_one.grads).abs().max() < 1e-5, alpha  # first order in α − 1: about 2e-6 here
        assert (beside.losses - at_one.losses).abs().max() < 1e-4, alpha
    assert (mimicry_gradients(logits, alpha=1.1).grads - at_one.grads).abs().max() > 1e-3  # the check can tell them apart
    zero = mimicry_gradients(logits, alpha=0.0)
    assert torch.count_nonzero(zero.grads) == 0 and torch.count_nonzero(zero.losses) == 0


def test_single_student_has_no_mimicry() -> None:
    result = mimicry_gradients(random_logits(1), alpha=2.0)
    assert result.grads.abs().max() == 0 and result.losses.shape == (1,)


def test_renyi_pairwise_divergence_limits() -> None:
    target, inp = random_logits(2)[0], random_logits(2, seed=3)[1]
    kl = F.kl_div(F.log_softmax(inp, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(renyi_divergence(target, inp, alpha=1.0), kl, rtol=1e-12)
    assert torch.allclose(kl_divergence(target, inp), kl, rtol=1e-12)
    assert renyi_divergence(target, inp, alpha=0.0) == 0
    near_one = renyi_divergence(target, inp, alpha=1 + 1e-6)
    assert abs(float(near_one - kl)) < 1e-5
    p, q = torch.softmax(target, -1), torch.softmax(inp, -1)
    bhattacharyya = (-2 * (p * q).sqrt().sum(-1).log()).mean()
    assert torch.allclose(renyi_divergence(target, inp, alpha=0.5), bhattacharyya, rtol=1e-12)


def test_direction_is_target_then_input() -> None:
    target, inp = random_logits(2, scale=3.0)[0], random_logits(2, seed=5, scale=0.5)[1]
    p, q = torch.softmax(target, -1), torch.softmax(inp, -1)
    expected = naive_prob_divergence("renyi", p, q, 2.0).mean()
    assert torch.allclose(renyi_divergence(target, inp, alpha=2.0), expected, rtol=1e-12)
    assert not torch.allclose(renyi_divergence(inp, target, alpha=2.0), expected, rtol=1e-3)


@pytest.mark.parametrize("alpha", [0.3, 2.0, 10.0, 100.0])
def test_extreme_logits_stay_finite_and_accurate(alpha: float) -> None:
    generator = torch.Generator().manual_seed(1)
    target = (torch.rand(8, 10, generator=generator) * 2 - 1) * 1e3
    inp = (torch.rand(8, 10, generator=generator) * 2 - 1) * 1e3
    value32 = renyi_divergence(target, inp, alpha=alpha)
    value64 = renyi_divergence(target.double(), inp.double(), alpha=alpha)
    assert torch.isfinite(value32)
    assert abs(float(value32) - float(value64)) <= 1e-5 * abs(float(value64))
    cohort = mimicry_gradients(torch.stack([target, inp]), alpha=alpha)
    assert torch.isfinite(cohort.grads).all() and torch.isfinite(cohort.losses).all()
    assert abs(float(cohort.losses[1]) - float(value64)) <= 1e-5 * abs(float(value64))


def test_factored_pairwise_path_matches_exact_path_and_falls_back_on_underflow() -> None:
    logp = F.log_softmax(random_logits(5, b=7, c=9), -1)
    per_pair, targets = _pairwise_renyi_factored(logp, 2.5)
    exact_pairs, exact_targets = _pairwise_renyi_exact(logp, 2.5)
    assert torch.allclose(per_pair, exact_pairs, rtol=1e-10) and torch.allclose(targets, exact_targets, rtol=1e-10)
    disjoint = torch.full((2, 1, 2), -1e4, dtype=torch.float64)
    disjoint[0, 0, 0] = disjoint[1, 0, 1] = 0.0
    assert _pairwise_renyi_factored(F.log_softmax(disjoint, -1), 0.5) is None
    losses = mimicry_gradients(disjoint, alpha=0.5).losses
    assert torch.allclose(losses, torch.full((2,), -2 * (-5000.0 + math.log(2)), dtype=torch.float64), rtol=1e-12)


def test_js_and_mse_values() -> None:
    target, inp = random_logits(2)[0], random_logits(2, seed=7)[1]
    p, q = torch.softmax(target, -1), torch.softmax(inp, -1)
    assert torch.allclose(js_divergence(target, inp), naive_prob_divergence("js", p, q, 1.0).mean())
    assert torch.allclose(js_divergence(target, inp), js_divergence(inp, target))
    assert torch.allclose(mse_logits(target, inp, temperature=2.0) * 4, F.mse_loss(inp, target))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"divergence": "wasserstein"}, "renyi, kl, js, mse_logits"),
        ({"mode": "sequential"}, "pairwise, ensemble"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mimicry_gradients(random_logits(2), **kwargs)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="K×B×C"):
        mimicry_gradients(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        divergence("kl", torch.zeros(2, 3), torch.zeros(2, 4))
