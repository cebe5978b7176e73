"""Students whose compute is a fixed sleep standing in for a GPU step, for benchmarks/engine_efficiency.py.

A GPU student's forward and backward keep its CPU almost idle; a sleep does the same on a CPU-only
machine, so what a step costs beyond the sleep is the engine's own work (and the student's Python),
which is what the benchmark measures. The model is one linear layer, so its logits are real.

The whole S is slept once, in the training forward: a GPU student's CPU queues its backward, its
optimizer step and its next forward without waiting, and blocks once per step, when the logits are
copied to the host for the exchange (which waits for all of that queued work).
"""

import math
import time

import torch
from torch import Tensor, nn


class SleepingLinear(nn.Module):
    """One linear layer whose training forward sleeps ``sleep_ms`` first (the step's one wait for the GPU)."""

    def __init__(self, features: int, num_classes: int, sleep_ms: float) -> None:
        super().__init__()
        self.linear = nn.Linear(features, num_classes)
        self.seconds = sleep_ms / 1000

    def forward(self, inputs: Tensor) -> Tensor:
        if self.training:
            time.sleep(self.seconds)
        return self.linear(inputs.flatten(1))


def sleeping_linear(num_classes: int, input_shape: tuple[int, ...], sleep_ms: float = 5.0) -> nn.Module:
    return SleepingLinear(math.prod(input_shape), num_classes, sleep_ms)


def random_features(classes: int = 100, samples: int = 5120, features: int = 32, seed: int = 0) -> tuple:
    """``samples`` training and ``samples // 8`` validation feature vectors with labels 0..classes-1 (each class present)."""
    generator = torch.Generator().manual_seed(seed)

    def part(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % classes
        return torch.randn(count, features, generator=generator), labels[torch.randperm(count, generator=generator)]

    return part(samples), part(max(samples // 8, classes))
