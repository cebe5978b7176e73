"""Models that fail at a chosen call, each fault once: the deterministic faults of the failure-path tests.

A fault is ``{"how": ..., "where": ..., "after": N}``:
- ``how``: ``exit`` (the process dies: ``os._exit``), ``raise`` (the student's own exception, as a CUDA
  out-of-memory error reads), ``non_finite`` (that forward's logits are NaN), ``hang`` (sleeps ``seconds``), ``wait_for`` (waits until the file ``path`` exists, at most
  ``seconds``: the test decides when the run goes on), ``kill_coordinator`` (SIGKILLs the
  coordinator process named in ``placements.json`` and waits until it is gone), ``kill_coordinator_and_exit``;
- ``where``: ``step`` (a training forward), ``state_dict`` (writing a checkpoint), ``evaluation`` (an
  evaluation forward) or ``restore`` (loading a checkpoint);
- ``after``: the training forwards this process must have made first (for ``step``: the step's index).

Faults fire in order, each once: fault ``i`` fires only after fault ``i - 1`` has, which the marker
files ``fault-<i>`` in ``markers`` record (they hold the pid of the process that fired). Ray students
import this module by its factory reference.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml_dist.models import build_model
from tests.integration.cli_process import kill_actor_process

SIMULATED_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test model)"


class Faulty(nn.Module):
    """The registry MLP, failing as ``faults`` say."""

    def __init__(self, inner: nn.Module, faults: list[dict[str, Any]], markers: str, run_dir: str) -> None:
        super().__init__()
        self.inner = inner
        self.faults, self.markers, self.run_dir = faults, Path(markers), Path(run_dir)
        self.training_forwards = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        poisoned = self._maybe_fail("step" if self.training else "evaluation")
        if self.training:
            self.training_forwards += 1
        logits = self.inner(inputs)
        return logits * float("nan") if poisoned else logits

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("state_dict")
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("restore")
        return super().load_state_dict(*args, **kwargs)

    def _maybe_fail(self, where: str) -> bool:
        """Fire the next fault if it is due here; True when it is a ``non_finite`` one (the caller poisons its output)."""
        for index, fault in enumerate(self.faults):
            marker = self.markers / f"fault-{index}"
            if marker.exists():
                continue
            if index > 0 and not (self.markers / f"fault-{index - 1}").exists():
                return False
            if fault["where"] != where or self.training_forwards < fault.get("after", 0):
                return False
            marker.write_text(str(os.getpid()))
            self._fail(fault)
            return fault["how"] == "non_finite"
        return False

    def _fail(self, fault: dict[str, Any]) -> None:
        how = fault["how"]
        if how in ("kill_coordinator", "kill_coordinator_and_exit"):
            pid = json.loads((self.run_dir / "placements.json").read_text())["coordinator"]["pid"]
            assert kill_actor_process(pid, "Coordinator"), f"the coordinator (pid {pid}) is not running"
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if how in ("exit", "kill_coordinator_and_exit"):
            os._exit(1)
        if how == "raise":
            raise RuntimeError(SIMULATED_OOM)
        if how == "hang":
            time.sleep(fault["seconds"])
        if how == "wait_for":
            deadline = time.monotonic() + fault["seconds"]
            while not Path(fault["path"]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def mlp_with_faults(num_classes: int, input_shape: tuple[int, ...], faults: list[dict[str, Any]], markers: str,
                    run_dir: str) -> nn.Module:
    return Faulty(build_model("mlp", num_classes=num_classes, input_shape=input_shape), faults, markers, run_dir)


def failing_factory(num_classes: int) -> nn.Module:
    """A user's model factory with a bug."""
    raise RuntimeError("the model factory failed: simulated bug in the user's code")


def hanging_factory(num_classes: int, input_shape: tuple[int, ...], seconds: float) -> nn.Module:
    """A model whose construction stalls for ``seconds`` (a data mount that hangs, a download that never ends)."""
    time.sleep(seconds)
    return build_model("mlp", num_classes=num_classes, input_shape=input_shape)
