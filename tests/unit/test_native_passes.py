"""The compiled Rényi step (rdml_dist/kernels/renyi_passes.c): both of its forms against the float64
reference, its fall-back to the careful torch path, and its switch."""

import os
import subprocess
import sys

import pytest
import torch

import rdml_dist.kernels.mimicry as kernels
from rdml_dist.kernels import native
from rdml_dist.divergence import MimicryWorkspace, mimicry_gradients, stack_by_sample
from tests.unit.test_divergence import assert_matches_reference, cohort_logits, reference_cohort

FORMS = {"whole step": 10**9, "passes around bmm": 0}  # native.WHOLE_STEP_MAX_SAMPLE_SIZE for each form


def torch_only(logits: torch.Tensor, **kwargs):
    """``mimicry_gradients`` with the compiled code out of the way."""
    with native.switched_off():
        return mimicry_gradients(logits, **kwargs)


def test_the_compiled_passes_are_built_and_serve_float32_on_the_cpu() -> None:
    """The install builds the extension wherever a C compiler exists (CI's machines have one): a
    broken build must fail here instead of silently leaving every step to torch."""
    if os.environ.get("RDML_DIST_NATIVE") == "0":
        pytest.skip("RDML_DIST_NATIVE=0 switches the compiled passes off")
    assert native.available()
    assert native.serves(torch.float32, torch.device("cpu"))
    assert not native.serves(torch.float64, torch.device("cpu"))


needs_passes = pytest.mark.skipif(not native.available(), reason="the compiled passes are not built")


@needs_passes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["random", "confident15", "confident50"])
@pytest.mark.parametrize("k,b,c", [(2, 1, 3), (3, 37, 10), (5, 16, 70), (17, 20, 9)])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (2.0, 3.0), (5.0, 1.0)])
def test_both_forms_match_the_float64_reference(
    form: str, kind: str, k: int, b: int, c: int, alpha: float, tau: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Odd batch sizes leave the last group of lanes short; small row blocks make the passes loop."""
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 4 * k * c * 3)  # three rows per block
    logits = cohort_logits(kind, k, b=b, c=c, seed=k + b)
    result = mimicry_gradients(logits.float(), alpha=alpha, temperature=tau)
    assert result.grads.dtype == torch.float32
    assert_matches_reference(result, reference_cohort("renyi", logits, alpha, tau, "pairwise"), rtol=1e-4, atol=1e-6)
    without_targets = mimicry_gradients(logits.float(), alpha=alpha, temperature=tau, with_targets=False)
    assert without_targets.targets is None
    assert torch.equal(without_targets.grads, result.grads) and torch.equal(without_targets.losses, result.losses)


@needs_passes
@pytest.mark.parametrize("form", FORMS)
def test_the_compiled_step_agrees_with_torch_alone(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    logits = cohort_logits("confident15", 6, b=40, c=30, seed=1).float()
    compiled, alone = mimicry_gradients(logits, alpha=2.0), torch_only(logits, alpha=2.0)
    for mine, theirs in zip(compiled, alone):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
    assert not torch.equal(compiled.grads, alone.grads)  # the compiled code did compute them (its rounding differs)


def with_disjoint_samples(logits: torch.Tensor, samples: list[int]) -> torch.Tensor:
    """``logits`` (float32) where, in ``samples``, every student puts +2000 on a class of its own:
    their peers' overlaps underflow even the factored form."""
    k, _, classes = logits.shape
    logits = logits.clone()
    for sample in samples:
        logits[torch.arange(k), sample, (torch.arange(k) + sample) % classes] += 2000.0
    return logits


@needs_passes
@pytest.mark.parametrize("form", FORMS)
def test_only_the_untrusted_samples_go_to_the_careful_path(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled code flags the samples it cannot trust; the careful path redoes those alone,
    and their losses join the others'."""
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 4 * 4 * 12 * 5)  # five rows per block
    redone: list[int] = []
    careful = kernels._pairwise_renyi
    monkeypatch.setattr(kernels, "_pairwise_renyi", lambda z, *args: (redone.append(z.shape[0]), careful(z, *args))[1])
    logits = with_disjoint_samples(cohort_logits("random", 4, b=19, c=12, seed=2).float(), [3, 11, 18])
    result = mimicry_gradients(logits, alpha=5.0)
    assert redone == [3]
    assert_matches_reference(result, reference_cohort("renyi", logits.double(), 5.0, 1.0, "pairwise"), rtol=1e-4, atol=1e-6)
    redone.clear()
    mimicry_gradients(cohort_logits("random", 4, b=19, c=12, seed=2).float(), alpha=5.0)
    assert redone == []


@needs_passes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_logits_give_what_torch_alone_gives(form: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    logits = cohort_logits("random", 4, b=19, c=12, seed=2).float()
    logits[1, 7, 3] = float(value)
    result, alone = mimicry_gradients(logits, alpha=5.0), torch_only(logits, alpha=5.0)
    for mine, theirs in zip(result, alone):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert not torch.isfinite(result.grads[:, 7]).all() and torch.isfinite(result.grads[:, :7]).all()


@needs_passes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_laid_out_by_sample_are_converted_first(dtype: torch.dtype) -> None:
    """Half-precision frames stacked by sample (the whole step's layout) are read as float32 values."""
    by_sample = cohort_logits("random", 3, b=40, c=10, seed=6).transpose(0, 1).contiguous().to(dtype)
    logits = by_sample.transpose(0, 1)
    result, alone = mimicry_gradients(logits, alpha=2.0), torch_only(logits, alpha=2.0)
    for mine, theirs in zip(result, alone):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=1e-4)


@needs_passes
@pytest.mark.parametrize("form", FORMS)
def test_an_order_near_one_keeps_the_losses_as_accurate_as_torch_alone(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The losses' terms cancel and are divided by α − 1: α must reach them unrounded (a cosine
    schedule passes close to 1)."""
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    logits = (cohort_logits("random", 4, b=64, c=10, seed=7) * 5 + 30).float()
    alpha = 1.00001
    reference = reference_cohort("renyi", logits.double(), alpha, 1.0, "pairwise")[2]
    compiled_error = (mimicry_gradients(logits, alpha=alpha).losses.double() - reference).abs().max()
    alone_error = (torch_only(logits, alpha=alpha).losses.double() - reference).abs().max()
    assert compiled_error <= 2 * alone_error, (float(compiled_error), float(alone_error))


@needs_passes
@pytest.mark.parametrize("form", FORMS)
def test_confident_students_losses_are_as_accurate_as_torch_alone(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Late in training every student puts a large logit on the same class: in the factors' logits
    α z and (1−α) m nearly cancel, and the losses then cancel again. The compiled factors take the
    small difference z − m first so that this loses nothing."""
    monkeypatch.setattr(native, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 128, 10, generator=generator)
    logits[:, torch.arange(128), torch.randint(10, (128,), generator=generator)] += 15.0
    reference = reference_cohort("renyi", logits.double(), 5.0, 1.0, "pairwise")[2]
    error = ((mimicry_gradients(logits, alpha=5.0).losses.double() - reference) / reference).abs().max()
    assert error <= 5e-7, float(error)


@needs_passes
def test_the_coordinators_workspace_gives_each_step_its_own_result() -> None:
    """As the coordinator runs it: frames stacked into a kept workspace, steps of other shapes between."""
    workspace = MimicryWorkspace()
    for k, b, c in [(3, 16, 10), (5, 33, 300), (3, 16, 10), (2, 7, 1000)]:
        frames = list(cohort_logits("confident15", k, b=b, c=c, seed=k * c).float().unbind(0))
        stacked = stack_by_sample(frames, torch.device("cpu"), workspace)
        kept = mimicry_gradients(stacked, alpha=2.0, with_targets=False, workspace=workspace)
        fresh = mimicry_gradients(torch.stack(frames), alpha=2.0, with_targets=False)
        assert torch.equal(kept.grads, fresh.grads) and torch.equal(kept.losses, fresh.losses)


@needs_passes
def test_a_strided_short_or_wrongly_typed_buffer_is_refused_by_name() -> None:
    """The loops would read or write such buffers wrongly, past their end even: they never get them."""
    block = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="contiguous torch.float32 CPU buffers"):
        native.factors(block, 2.0, 1.0, torch.empty(4, 2, 3, 16)[..., :8], torch.empty(4, 6))
    with pytest.raises(ValueError, match="need 24 elements in a torch.float32 buffer, got 23"):
        native.factors(block, 2.0, 1.0, torch.empty(4, 2, 3, 8), torch.empty(23))
    flags, sums = torch.empty(4, dtype=torch.uint8), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="need 96 elements"):
        native.step(block, 2.0, 1.0, 0.25, 1e-30, torch.empty(4, 3, 7), None, sums, flags, torch.empty(3))
    with pytest.raises(ValueError, match="contiguous torch.float64 CPU buffers"):
        native.step(block, 2.0, 1.0, 0.25, 1e-30, torch.empty(4, 3, 8), None, sums.float(), flags, torch.empty(3))


def test_the_switch_leaves_every_step_to_torch() -> None:
    """``RDML_DIST_NATIVE=0``: nothing compiled is loaded, and the step still runs."""
    probe = (
        "import torch; from rdml_dist.kernels import native; from rdml_dist.divergence import mimicry_gradients;"
        "assert not native.available();"
        "result = mimicry_gradients(torch.randn(3, 8, 10), alpha=2.0);"
        "assert torch.isfinite(result.grads).all(); print('torch only')"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "RDML_DIST_NATIVE": "0"}, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "torch only"
