"""A model whose process dies at a chosen moment outside the training steps, once per marker file.

A SIGKILL from the test cannot aim at the short time a student spends writing its checkpoint or
scoring the epoch; the model itself can. Ray students import this module by its factory reference.
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml_dist.models import build_model


class DiesOnce(nn.Module):
    """The registry MLP; after ``after_steps`` training forwards, the process exits in the next
    ``state_dict`` (``during="checkpoint"``) or evaluation forward (``during="evaluation"``), unless
    ``marker`` exists: the first death creates it, so the restarted process lives."""

    def __init__(self, inner: nn.Module, marker: str, during: str, after_steps: int) -> None:
        super().__init__()
        if during not in ("checkpoint", "evaluation"):
            raise ValueError(f"during must be 'checkpoint' or 'evaluation', not {during!r}")
        self.inner = inner
        self.marker, self.during, self.after_steps = Path(marker), during, after_steps
        self.training_forwards = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.training_forwards += 1
        elif self.during == "evaluation":
            self._maybe_die()
        return self.inner(inputs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if self.during == "checkpoint":
            self._maybe_die()
        return super().state_dict(*args, **kwargs)

    def _maybe_die(self) -> None:
        if self.training_forwards >= self.after_steps and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)


def mlp_that_dies_once(num_classes: int, input_shape: tuple[int, ...], marker: str, during: str, after_steps: int) -> nn.Module:
    return DiesOnce(build_model("mlp", num_classes=num_classes, input_shape=input_shape), marker, during, after_steps)
