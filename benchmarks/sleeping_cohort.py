"""Students whose compute is a fixed sleep standing in for a GPU step, for benchmarks/engine_efficiency.py.

A GPU student's forward and backward keep its CPU almost idle; a sleep does the same on a CPU-only
machine, so what a step costs beyond the sleep is the engine's own work (and the student's Python),
which is what the benchmark measures. The model is one linear layer, so its logits are real.
"""

import math
import time

import torch
from torch import Tensor, nn


class _SleepInBackward(torch.autograd.Function):
    """Identity forward; the backward sleeps ``seconds`` first (the backward half of the stand-in step)."""

    @staticmethod
    def forward(context: torch.autograd.function.FunctionCtx, inputs: Tensor, seconds: float) -> Tensor:  # type: ignore[override]
        context.seconds = seconds
        return inputs.view_as(inputs)

    @staticmethod
    def backward(context: torch.autograd.function.FunctionCtx, gradient: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        time.sleep(context.seconds)
        return gradient, None


class SleepingLinear(nn.Module):
    """One linear layer whose training forward and backward each sleep half of ``sleep_ms``."""

    def __init__(self, features: int, num_classes: int, sleep_ms: float) -> None:
        super().__init__()
        self.linear = nn.Linear(features, num_classes)
        self.half_seconds = sleep_ms / 2000

    def forward(self, inputs: Tensor) -> Tensor:
        if not self.training:
            return self.linear(inputs.flatten(1))
        time.sleep(self.half_seconds)
        return _SleepInBackward.apply(self.linear(inputs.flatten(1)), self.half_seconds)


def sleeping_linear(num_classes: int, input_shape: tuple[int, ...], sleep_ms: float = 5.0) -> nn.Module:
    return SleepingLinear(math.prod(input_shape), num_classes, sleep_ms)


def random_features(classes: int = 100, samples: int = 5120, features: int = 32, seed: int = 0) -> tuple:
    """``samples`` training and ``samples // 8`` validation feature vectors with labels 0..classes-1 (each class present)."""
    generator = torch.Generator().manual_seed(seed)

    def part(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % classes
        return torch.randn(count, features, generator=generator), labels[torch.randperm(count, generator=generator)]

    return part(samples), part(max(samples // 8, classes))
