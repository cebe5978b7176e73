"""The divergence math against independent naive formulas (float64) and its numerical limits."""

import itertools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import rdml_dist.divergence as divergence_module
import rdml_dist.kernels.mimicry as kernels
from rdml_dist.divergence import (
    DIVERGENCES,
    divergence,
    js_divergence,
    kl_divergence,
    mimicry_gradients,
    mse_logits,
    renyi_divergence,
)
from rdml_dist.errors import ConfigError


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


def reference_pair(name: str, teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """Per-sample D(teacher ‖ student), the Rényi/KL target and ∂D/∂(student's scaled logits), from log-probs.

    Written from the formulas, one pair at a time, in log space with torch.logsumexp (float64).
    """
    q = student.exp()
    if name == "js":
        log_mixture = torch.logaddexp(teacher, student) - math.log(2)
        value = 0.5 * (teacher.exp() * (teacher - log_mixture)).sum(-1) + 0.5 * (q * (student - log_mixture)).sum(-1)
        slope = 0.5 * (student - log_mixture)  # ∂JS/∂q
        return value, None, q * (slope - (q * slope).sum(-1, keepdim=True))
    if name == "kl" or alpha == 1:
        target = teacher.exp()
        return (target * (teacher - student)).sum(-1), target, q - target
    mix = alpha * teacher + (1 - alpha) * student
    log_norm = torch.logsumexp(mix, dim=-1, keepdim=True)
    target = (mix - log_norm).exp()
    return log_norm.squeeze(-1) / (alpha - 1), target, q - target


def reference_cohort(name: str, logits: torch.Tensor, alpha: float, tau: float, mode: str) -> tuple[torch.Tensor, ...]:
    """Targets (None for JS), grads and losses of every student by a loop over students and peers (float64)."""
    logp = torch.log_softmax(logits.double() / tau, dim=-1)
    k, batch, _ = logp.shape
    targets, grads, losses = [], [], []
    for student in range(k):
        others = [j for j in range(k) if j != student]
        if mode == "pairwise":
            teachers = [logp[j] for j in others]
        else:
            teachers = [torch.logsumexp(logp[others], dim=0) - math.log(k - 1)]
        pairs = [reference_pair(name, teacher, logp[student], alpha) for teacher in teachers]
        losses.append(torch.stack([value.mean() for value, _, _ in pairs]).mean())
        grads.append(torch.stack([grad for _, _, grad in pairs]).mean(0) / (tau * batch))
        if name != "js":
            targets.append(torch.stack([target for _, target, _ in pairs]).mean(0))
    return (torch.stack(targets) if targets else None), torch.stack(grads), torch.stack(losses)


COHORT_KINDS = ["random", "confident15", "confident50", "confident500", "disjoint", "huge"]


def cohort_logits(kind: str, k: int, b: int = 5, c: int = 20, seed: int = 0) -> torch.Tensor:
    """Float64 K×B×C logits: random; confident (+bonus on a class most students share); disjoint
    (+2000 on a class no other student picks: support overlap ~e^-1000); huge (uniform ±1e3)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "huge":
        return (torch.rand(k, b, c, generator=generator, dtype=torch.float64) * 2 - 1) * 1e3
    logits = torch.randn(k, b, c, generator=generator, dtype=torch.float64) * 2
    if kind == "random":
        return logits
    students, samples = torch.arange(k)[:, None], torch.arange(b)[None, :]
    if kind == "disjoint":
        peak, bonus = (students + samples) % c, 2000.0
    else:
        label = torch.randint(c, (b,), generator=generator)[None, :]
        agrees = (students + samples) % 4 != 0
        peak, bonus = torch.where(agrees, label, (label + 1 + students) % c), float(kind.removeprefix("confident"))
    logits[students, samples, peak] += bonus
    return logits


def assert_matches_reference(result, reference, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    """Relative (norm per student) agreement of targets, grads and losses; atol only for values that are ~0."""
    ref_targets, ref_grads, ref_losses = reference
    for student in range(ref_grads.shape[0]):
        grad_error = (result.grads[student].double() - ref_grads[student]).norm()
        assert grad_error <= rtol * ref_grads[student].norm() + atol, (student, float(grad_error))
        if ref_targets is not None:
            target_error = (result.targets[student].double() - ref_targets[student]).norm()
            assert target_error <= rtol * ref_targets[student].norm(), (student, float(target_error))
    loss_error = (result.losses.double() - ref_losses).abs()
    assert torch.all(loss_error <= rtol * ref_losses.abs() + atol), (result.losses, ref_losses)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("kind", COHORT_KINDS)
@pytest.mark.parametrize("k", [2, 3, 16])
@pytest.mark.parametrize("alpha", [0.01, 0.5, 0.999, 1.001, 2.0, 5.0, 50.0])
def test_renyi_cohort_matches_per_pair_reference(alpha: float, k: int, kind: str, mode: str) -> None:
    logits = cohort_logits(kind, k, seed=k)
    tau = 2.0 if k == 3 else 1.0
    result = mimicry_gradients(logits, alpha=alpha, temperature=tau, mode=mode)
    assert_matches_reference(result, reference_cohort("renyi", logits, alpha, tau, mode))


@pytest.mark.parametrize("kind", ["random", "disjoint"])
@pytest.mark.parametrize("k", [kernels._WHOLE_LOSS_MAP_MAX_K, kernels._WHOLE_LOSS_MAP_MAX_K + 1])
@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_renyi_losses_match_the_reference_on_both_sides_of_the_whole_loss_map(alpha: float, k: int, kind: str) -> None:
    """Small cohorts apply the losses' map to the batch sums as one matrix, larger ones part by part."""
    logits = cohort_logits(kind, k, seed=k)
    result = mimicry_gradients(logits.float(), alpha=alpha)
    reference = reference_cohort("renyi", logits, alpha, 1.0, "pairwise")
    assert torch.allclose(result.losses.double(), reference[2], rtol=1e-5, atol=1e-6)
    assert_matches_reference(mimicry_gradients(logits, alpha=alpha), reference)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
@pytest.mark.parametrize("kind", COHORT_KINDS)
@pytest.mark.parametrize("k", [2, 3, 16])
@pytest.mark.parametrize("name", ["kl", "js"])
def test_kl_and_js_cohort_match_per_pair_reference(name: str, k: int, kind: str, mode: str) -> None:
    logits = cohort_logits(kind, k, seed=20 + k)
    tau = 2.0 if k == 3 else 1.0
    result = mimicry_gradients(logits, temperature=tau, mode=mode, divergence=name)
    assert torch.isfinite(result.grads).all() and torch.isfinite(result.losses).all()
    assert_matches_reference(result, reference_cohort(name, logits, 1.0, tau, mode))


@pytest.mark.parametrize("kind", ["random", "confident15", "confident50", "disjoint"])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
def test_float32_cohort_is_accurate_to_float32(alpha: float, kind: str) -> None:
    logits = cohort_logits(kind, 8, b=16, c=100, seed=3)
    result = mimicry_gradients(logits.float(), alpha=alpha)
    assert result.grads.dtype == torch.float32
    assert_matches_reference(result, reference_cohort("renyi", logits, alpha, 1.0, "pairwise"), rtol=1e-4, atol=1e-6)


def test_half_precision_logits_are_computed_in_float32() -> None:
    logits = cohort_logits("confident15", 4, b=8, c=50, seed=4)
    result = mimicry_gradients(logits.to(torch.bfloat16), alpha=5.0)
    assert result.grads.dtype == torch.bfloat16 and torch.isfinite(result.losses).all()
    reference = reference_cohort("renyi", logits.to(torch.bfloat16).double(), 5.0, 1.0, "pairwise")
    assert torch.allclose(result.losses.double(), reference[2], rtol=2e-2)


@pytest.mark.parametrize(
    "kind,alpha,exact",
    [("random", 5.0, False), ("confident15", 2.0, False), ("confident15", 5.0, False), ("disjoint", 0.5, True)],
)
def test_only_pairs_with_disjoint_support_are_recomputed_exactly(
    kind: str, alpha: float, exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confident cohorts stay on the matmul path (no cliff); disjoint peers take the exact one, so the
    reference tests above cover both."""
    recomputed: list[int] = []
    original = kernels._recompute_underflowed_pairs

    def counting(z, alpha, temperature, scale, mask, out):
        recomputed.append(int(mask.sum()))
        return original(z, alpha, temperature, scale, mask, out)

    monkeypatch.setattr(kernels, "_recompute_underflowed_pairs", counting)
    logits = cohort_logits(kind, 16, b=32, c=100, seed=5)
    mimicry_gradients(logits.float(), alpha=alpha)
    mimicry_gradients(logits, alpha=alpha)
    assert (sum(recomputed) > 0) == exact, recomputed


@pytest.mark.parametrize("name,mode,alpha", [("renyi", "pairwise", 2.0), ("renyi", "ensemble", 0.5), ("kl", "pairwise", 1.0)])
def test_a_batch_split_into_row_blocks_gives_the_same_result(
    name: str, mode: str, alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The closed form runs a block of batch rows at a time; one row per block must change nothing."""
    logits = cohort_logits("confident15", 5, b=7, c=11, seed=9)
    untouched = logits.clone()
    whole = mimicry_gradients(logits, alpha=alpha, temperature=2.0, mode=mode, divergence=name)
    single_row = mimicry_gradients(logits[:, :1], alpha=alpha, temperature=2.0, mode=mode, divergence=name)
    assert torch.equal(logits, untouched)  # the caller's logits are never scaled in place
    assert torch.allclose(single_row.grads, whole.grads[:, :1] * 7, rtol=1e-10)  # batch mean over 1 row vs 7
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 1)
    blocks = mimicry_gradients(logits, alpha=alpha, temperature=2.0, mode=mode, divergence=name)
    for together, apart in zip(whole, blocks):
        assert torch.allclose(together, apart, rtol=1e-12, atol=1e-15)
    assert_matches_reference(blocks, reference_cohort(name, logits, alpha, 2.0, mode))


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from rdml_dist.divergence import mimicry_gradients
    torch.set_num_threads(1)
    k, b, c = 64, 256, 1000
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(k, b, c, generator=generator)
    logits[:, torch.arange(b), torch.randint(c, (b,), generator=generator)] += 15.0  # confident, agreeing
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = mimicry_gradients(logits, alpha=float(sys.argv[1]), divergence=sys.argv[2], mode=sys.argv[3])
    seconds = time.perf_counter() - started
    assert torch.isfinite(result.grads).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - before) / 1024, "seconds": seconds}))
    """
)


@pytest.mark.parametrize("alpha,name,mode", [(5.0, "renyi", "pairwise"), (2.0, "renyi", "ensemble")])
def test_large_cohort_memory_is_linear_in_k(alpha: float, name: str, mode: str) -> None:
    """K=64, B=256, C=1000 float32, confident students: one K×K×B×C tensor would be 4.2 GB; the
    computation must stay within a few K×B×C tensors (65 MB each) and a few seconds."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(alpha), name, mode], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    measured = json.loads(completed.stdout)
    assert measured["extra_mib"] < 1024, measured
    assert measured["seconds"] < 60, measured


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
        ({"divergence": "wasserstein"}, ", ".join(DIVERGENCES)),
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


USER_DIVERGENCES = textwrap.dedent(
    '''
    """A user's own divergences, in a module beside the experiment's config."""
    from rdml_dist.divergence import Divergence


    def squared_hellinger(target_logp, input_logp, alpha):
        return 1 - ((target_logp + input_logp) / 2).exp().sum(-1)


    hellinger = Divergence("hellinger", squared_hellinger)
    not_a_divergence = squared_hellinger
    '''
)


@pytest.fixture
def user_module_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A directory holding ``user_divergences.py``, first on the import path (as the config's directory is)."""
    (tmp_path / "user_divergences.py").write_text(USER_DIVERGENCES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("user_divergences", None)


@pytest.mark.parametrize("mode", ["pairwise", "ensemble"])
def test_a_user_divergence_named_by_module_reference_gets_autograd_gradients(user_module_dir, mode: str) -> None:
    """No closed form: the cohort's gradients come from differentiating the user's value, and match a naive loop."""
    logits = random_logits(4, seed=31)
    tau = 2.0
    result = mimicry_gradients(logits, temperature=tau, mode=mode, divergence="user_divergences:hellinger")
    for student in range(4):
        leaf = logits.clone().requires_grad_(True)
        peers = [torch.softmax(leaf[j].detach() / tau, -1) for j in range(4) if j != student]
        q = torch.softmax(leaf[student] / tau, -1)
        teachers = peers if mode == "pairwise" else [torch.stack(peers).mean(0)]
        loss = torch.stack([(1 - (p * q).sqrt().sum(-1)).mean() for p in teachers]).mean()
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.allclose(result.losses[student], loss.detach(), rtol=1e-9)
        assert (result.grads[student] - grad[student]).norm() <= 1e-9 * grad[student].norm()
    assert torch.allclose(result.targets.sum(-1), torch.ones(4, 6, dtype=torch.float64))


def test_a_registered_divergence_is_used_by_name_and_names_are_not_taken_twice() -> None:
    twice_kl = divergence_module.Divergence("twice_kl", lambda target, inp, alpha: 2 * (target.exp() * (target - inp)).sum(-1))
    divergence_module.register_divergence(twice_kl)
    try:
        logits = random_logits(3, seed=8)
        assert torch.allclose(mimicry_gradients(logits, divergence="twice_kl").losses,
                              2 * mimicry_gradients(logits, divergence="kl").losses, rtol=1e-10)
        with pytest.raises(ValueError, match="already registered"):
            divergence_module.register_divergence(twice_kl)
    finally:
        divergence_module.DIVERGENCES.pop("twice_kl")


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("wasserstein", f"unknown divergence 'wasserstein' (registered: {', '.join(DIVERGENCES)};"),
        ("user_divergences:not_a_divergence", "is a function, not a rdml_dist.divergence.Divergence"),
        ("user_divergences:missing", "module 'user_divergences' has no attribute 'missing'"),
        ("no_such_module_here:hellinger", "cannot import module 'no_such_module_here'"),
        ("user_divergences:", "must look like 'package.module:name'"),
    ],
)
def test_a_name_that_is_not_a_divergence_is_refused_naming_the_field(user_module_dir, name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        divergence_module.resolve_divergence(name, field="mimicry.divergence")
    assert caught.value.field == "mimicry.divergence" and fragment in caught.value.problem, caught.value.problem


@pytest.mark.parametrize("name,mode", [("renyi", "pairwise"), ("renyi", "ensemble"), ("kl", "pairwise")])
def test_a_workspace_reuses_its_buffers_and_changes_no_result(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of changing size (a short last batch, then full again) through one workspace give exactly
    what fresh buffers give, and the full batch's gradients land in the same memory every time."""
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 512)  # several row blocks per call
    workspace = divergence_module.MimicryWorkspace()
    addresses = []
    for seed, rows in enumerate([16, 5, 16]):
        logits = cohort_logits("confident15", 6, b=rows, c=20, seed=seed).float()
        fresh = mimicry_gradients(logits, alpha=3.0, mode=mode, divergence=name, with_targets=False)
        reused = mimicry_gradients(logits, alpha=3.0, mode=mode, divergence=name, with_targets=False, workspace=workspace)
        assert torch.equal(fresh.grads, reused.grads) and torch.equal(fresh.losses, reused.losses)
        if rows == 16:
            addresses.append(reused.grads.data_ptr())
    assert addresses[0] == addresses[1]


def test_a_workspace_that_grows_gives_later_views_of_its_new_buffers() -> None:
    """A short batch, a longer one (the buffers grow), then the short one again: its result lands at the
    start of the grown buffer, not in the memory of the views made before (kept views are dropped)."""
    workspace = divergence_module.MimicryWorkspace()
    grads = {}
    for step, rows in enumerate([5, 16, 5]):
        logits = cohort_logits("random", 4, b=rows, c=20, seed=step).float()
        fresh = mimicry_gradients(logits, alpha=3.0, with_targets=False)
        reused = mimicry_gradients(logits, alpha=3.0, with_targets=False, workspace=workspace)
        assert torch.equal(fresh.grads, reused.grads) and torch.equal(fresh.losses, reused.losses)
        grads[step] = reused.grads
    assert grads[2].data_ptr() == grads[1].data_ptr() != grads[0].data_ptr()


def test_stacking_by_sample_converts_the_wire_dtype_into_the_workspace() -> None:
    frames = [torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) for seed in range(5)]
    workspace = divergence_module.MimicryWorkspace()
    stacked = divergence_module.stack_by_sample(frames, torch.device("cpu"), workspace)
    assert stacked.shape == (5, 4, 3) and stacked.dtype == torch.float32
    assert torch.equal(stacked, torch.stack(frames).float())
    assert stacked.transpose(0, 1).is_contiguous()  # by sample: the row blocks are plain slices
