"""Students trained as GPU users train them, on the CPU: bf16 autocast, fp16 with its gradient scaler,
channels-last image models and ``torch.compile``, each through the real Student and the local engine."""

from pathlib import Path
from typing import Any

import pytest
import torch

from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines.local import train_local
from rdml_dist.errors import ConfigError
from rdml_dist.students.student import Student
from tests.unit.data_files import write_cifar


def config(cohort: dict[str, Any], model: str = "mlp", data: dict[str, Any] | None = None, **first: Any) -> ExperimentConfig:
    """Two students; ``cohort`` is the cohort's ``training.compute``, ``first`` more fields of student ``a``."""
    return parse_config({
        "name": "compute", "seed": 0, "data": data or {"name": "digits"},
        "students": [{"name": "a", "model": model, **first}, {"name": "b", "model": "mlp"}],
        "training": {"epochs": 1, "batch_size": 128, "compute": cohort},
        "runtime": {"engine": "local", "torch_threads": 1}, "monitoring": {"enabled": False},
    })


def one_step(student: Student, step: int = 0) -> torch.Tensor:
    """A step with a zero mimicry gradient; returns the frame's logits."""
    frame = student.forward_step(step)
    student.apply(torch.zeros_like(frame.logits))
    return frame.logits


def weights(student: Student) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in student.model.state_dict().items()}


def test_bf16_autocasts_the_forward_and_sends_float32_logits() -> None:
    student = Student(config({"precision": "bf16"}), 0)
    inputs = student.compute.prepare(student.dataset.train.batch(torch.arange(4))[0])
    assert student.compute.forward(inputs).dtype == torch.bfloat16
    before = weights(student)
    logits = one_step(student)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert any(not torch.equal(before[name], tensor) for name, tensor in student.model.state_dict().items())
    assert all(tensor.dtype == torch.float32 for tensor in student.model.state_dict().values())  # master weights stay float32


def test_fp16_skips_an_overflowing_scaled_step_as_the_scaler_does_and_keeps_its_state(tmp_path: Path) -> None:
    student = Student(config({"precision": "fp16", "fp16_init_scale": 2.0**40}), 0)
    assert student.compute.forward(student.compute.prepare(student.dataset.train.batch(torch.arange(4))[0])).dtype == torch.float16
    before = weights(student)
    one_step(student)  # 2^40 times the gradients overflows: the scaler skips the step and lowers its scale
    assert student.compute.skipped_steps == 1 and student.compute.scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[name], tensor) for name, tensor in student.model.state_dict().items())
    for step in range(1, 60):
        one_step(student, step)
        if student.compute.skipped_steps < step + 1:
            break
    assert student.compute.skipped_steps < 60 and any(
        not torch.equal(before[name], tensor) for name, tensor in student.model.state_dict().items())
    restored = Student(config({"precision": "fp16", "fp16_init_scale": 2.0**40}), 0)
    restored.load_state_dict(student.state_dict())  # the scaler's scale is part of the checkpoint
    assert restored.compute.scaler.get_scale() == student.compute.scaler.get_scale()
    assert restored.compute.skipped_steps == student.compute.skipped_steps


def test_an_fp16_run_whose_scaler_skips_steps_records_no_failure(tmp_path: Path) -> None:
    run = train_local(config({"precision": "fp16", "fp16_init_scale": 2.0**40}), tmp_path / "run", show_progress=False)
    assert run.events == [] and len(run.epochs) == 1  # every step of the epoch skipped by the scaler, none a fault
    assert all(0 <= entry["val_accuracy"] <= 1 for entry in run.epochs[0]["students"].values())


def test_channels_last_puts_an_image_model_and_its_batches_in_that_format(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", per_file=40)  # three channels: the two layouts differ
    data = {"name": "cifar10", "root": str(tmp_path)}
    student = Student(config({"channels_last": True}, model="small_cnn", data=data), 0)
    convolutions = [tensor for tensor in student.model.parameters() if tensor.dim() == 4]
    assert convolutions and all(tensor.is_contiguous(memory_format=torch.channels_last) for tensor in convolutions)
    seen: list[torch.Tensor] = []
    student.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    logits = one_step(student)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    reference = Student(config({}, model="small_cnn", data=data), 0)
    torch.testing.assert_close(logits, one_step(reference), rtol=1e-4, atol=1e-5)  # the same model, another layout


def test_compile_happens_before_the_first_step_and_changes_nothing_but_the_clock() -> None:
    compiled = Student(config({"compile": True, "compile_backend": "aot_eager"}), 0)
    plain = Student(config({}), 0)
    assert compiled.compute.compile_seconds > 0 and plain.compute.compile_seconds == 0
    assert all(torch.equal(plain.model.state_dict()[name], tensor) for name, tensor in compiled.model.state_dict().items())
    assert set(compiled.state_dict()["model"]) == set(plain.state_dict()["model"])  # no wrapper's prefix in checkpoints
    for step in range(3):
        torch.testing.assert_close(one_step(compiled, step), one_step(plain, step), rtol=1e-5, atol=1e-6)
    assert compiled.last_measures is not None and compiled.last_measures.compute_seconds < compiled.compute.compile_seconds


@pytest.mark.parametrize("compute, field", [
    ({"precision": "fp8"}, "training.compute.precision"),
    ({"fp16_init_scale": 0}, "training.compute.fp16_init_scale"),
    ({"channels_last": "sometimes"}, "training.compute.channels_last"),
    ({"compiled": True}, "training.compute.compiled"),
])
def test_compute_settings_are_checked_naming_the_field(compute: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        config(compute)
    assert field in str(error.value)


def test_a_student_overrides_the_cohorts_compute_settings() -> None:
    cohort = config({"precision": "bf16"}, compute={"precision": "fp32"})
    assert Student(cohort, 0).compute.settings.precision == "fp32"
    assert Student(cohort, 1).compute.settings.precision == "bf16"


def test_a_frames_loss_and_counts_are_those_of_its_logits_brought_to_the_host_together() -> None:
    student = Student(config({}), 0)
    frame = student.forward_step(0)
    _, indices, _ = student._last_batch
    labels = student.dataset.train.batch(indices)[1]
    assert frame.logits.device.type == "cpu" and not frame.logits.requires_grad
    assert frame.labelled == len(labels)
    assert frame.correct == int((frame.logits.argmax(-1) == labels).sum())
    assert frame.ce_loss == pytest.approx(float(torch.nn.functional.cross_entropy(frame.logits, labels)), rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_mimicry_gradient_fed_into_the_logits_steps_as_the_backward_of_the_summed_loss_bit_for_bit(precision: str) -> None:
    """A step gives the same weights, to the bit, as a backward of ``ce + (logits * grad).sum()`` (scaled for fp16)."""
    fed, summed = (Student(config({"precision": precision}, model="resnet20"), 0) for _ in range(2))
    grads = torch.Generator().manual_seed(3)
    for step in range(3):
        frame = fed.forward_step(step)
        grad = torch.randn(frame.logits.shape, generator=grads) * 0.01
        fed.apply(grad)
        summed.forward_step(step)
        _, logits, ce, _ = summed._pending
        summed._pending = None
        summed.optimizer.zero_grad(set_to_none=True)
        loss = ce + (logits.float() * grad).sum()
        summed.compute.scaler.scale(loss).backward()
        summed.compute.scaler.step(summed.optimizer)
        summed.compute.scaler.update()
    assert all(torch.equal(tensor, summed.model.state_dict()[name]) for name, tensor in fed.model.state_dict().items())
    untrained = dict(Student(config({"precision": precision}, model="resnet20"), 0).model.named_parameters())
    assert fed.compute.skipped_steps < 3  # some step was taken, so the weights compared above have moved
    assert any(not torch.equal(parameter, untrained[name]) for name, parameter in fed.model.named_parameters())
