"""The compiled Rényi step (rdml_dist/native/renyi_passes.c): both of its forms against the float64
reference, its fall-back to the careful torch path, and its switch."""

import os
import subprocess
import sys

import pytest
import torch

import rdml_dist.divergence as divergence_module
from rdml_dist import native_passes
from rdml_dist.divergence import mimicry_gradients
from tests.unit.test_divergence import assert_matches_reference, cohort_logits, reference_cohort

FORMS = {"whole step": 10**9, "passes around bmm": 0}  # native_passes.WHOLE_STEP_MAX_SAMPLE_SIZE for each form


def torch_only(logits: torch.Tensor, **kwargs):
    """``mimicry_gradients`` with the compiled code out of the way."""
    with native_passes.switched_off():
        return mimicry_gradients(logits, **kwargs)


def test_the_compiled_passes_are_built_and_serve_float32_on_the_cpu() -> None:
    """The install builds the extension wherever a C compiler exists (CI's machines have one): a
    broken build must fail here instead of silently leaving every step to torch."""
    if os.environ.get("RDML_DIST_NATIVE") == "0":
        pytest.skip("RDML_DIST_NATIVE=0 switches the compiled passes off")
    assert native_passes.available()
    assert native_passes.serves(torch.float32, torch.device("cpu"))
    assert not native_passes.serves(torch.float64, torch.device("cpu"))


needs_passes = pytest.mark.skipif(not native_passes.available(), reason="the compiled passes are not built")


@needs_passes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["random", "confident15", "confident50"])
@pytest.mark.parametrize("k,b,c", [(2, 1, 3), (3, 37, 10), (5, 16, 70), (17, 20, 9)])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (2.0, 3.0), (5.0, 1.0)])
def test_both_forms_match_the_float64_reference(
    form: str, kind: str, k: int, b: int, c: int, alpha: float, tau: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Odd batch sizes leave the last group of lanes short; small row blocks make the passes loop."""
    monkeypatch.setattr(native_passes, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    monkeypatch.setattr(divergence_module, "_CHUNK_BYTES", 4 * k * c * 3)  # three rows per block
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
    monkeypatch.setattr(native_passes, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    logits = cohort_logits("confident15", 6, b=40, c=30, seed=1).float()
    compiled, alone = mimicry_gradients(logits, alpha=2.0), torch_only(logits, alpha=2.0)
    for mine, theirs in zip(compiled, alone):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
    assert not torch.equal(compiled.grads, alone.grads)  # the compiled code did compute them (its rounding differs)


def compiled_step(logits: torch.Tensor, alpha: float) -> int:
    """The whole compiled step on K×B×C float32 logits; its count of untrusted samples."""
    k, batch, classes = logits.shape
    grads = torch.empty(batch, k, classes)
    loss_sums = torch.zeros(k, dtype=torch.float64)
    floor = divergence_module._trusted_floor(classes, torch.float32)
    return native_passes.step(logits.transpose(0, 1), alpha, 1.0, 1 / batch, floor, grads, None, loss_sums)


@needs_passes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["disjoint", "nan", "inf"])
def test_untrusted_overlaps_leave_the_batch_to_the_careful_torch_path(form: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers with disjoint support underflow the factored overlaps, and non-finite logits spoil
    them: the compiled code says so, and the result is then exactly the torch path's."""
    monkeypatch.setattr(native_passes, "WHOLE_STEP_MAX_SAMPLE_SIZE", FORMS[form])
    logits = cohort_logits("disjoint" if kind == "disjoint" else "random", 4, b=19, c=12, seed=2).float()
    if kind != "disjoint":
        logits[1, 7, 3] = float(kind)
    assert compiled_step(logits, 5.0) > 0
    assert compiled_step(cohort_logits("random", 4, b=19, c=12, seed=2).float(), 5.0) == 0
    result, alone = mimicry_gradients(logits, alpha=5.0), torch_only(logits, alpha=5.0)
    for mine, theirs in zip(result, alone):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
    if kind == "disjoint":
        assert_matches_reference(result, reference_cohort("renyi", logits.double(), 5.0, 1.0, "pairwise"), rtol=1e-4, atol=1e-6)


@needs_passes
def test_a_strided_buffer_is_refused_by_name() -> None:
    block = torch.randn(4, 3, 8)
    into = torch.empty(4, 2, 3, 16)[..., :8]
    with pytest.raises(ValueError, match="contiguous buffers"):
        native_passes.factors(block, 2.0, 1.0, into, torch.empty(4, 6))


def test_the_switch_leaves_every_step_to_torch() -> None:
    """``RDML_DIST_NATIVE=0``: nothing compiled is loaded, and the step still runs."""
    probe = (
        "import torch; from rdml_dist import native_passes; from rdml_dist.divergence import mimicry_gradients;"
        "assert not native_passes.available();"
        "result = mimicry_gradients(torch.randn(3, 8, 10), alpha=2.0);"
        "assert torch.isfinite(result.grads).all(); print('torch only')"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "RDML_DIST_NATIVE": "0"}, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "torch only"
