"""Cohort checkpoints in a run's storage: one directory per step, complete or absent.

``checkpoints/step-00000046/`` holds ``<student>.pt`` for every member, written by the students
themselves, and ``manifest.json``, written last by the driver once every student's file is in
place. A directory without a manifest is an interrupted checkpoint: it is never restored from
and is removed by :meth:`CheckpointStore.prune`. Everything saved is CPU tensors, whatever device
the student trains on, so any process (a CPU-only head node included) can read it back.
"""

import io
import json
from collections.abc import Mapping
from typing import Any

import torch

from rdml_dist.errors import ConfigError
from rdml_dist.run_records.storage import Storage

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STEP_PREFIX = "step-"
# The run directory's format, in every manifest: 2 adds the version itself and step-log parts read by their header's
# column names. A manifest without one is format 1, read as it is; a newer one is refused, naming both.
FORMAT = 2


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside (dicts, lists, tuples) detached and copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def checkpoint_directory(step: int) -> str:
    return f"{CHECKPOINTS}/{STEP_PREFIX}{step:08d}"


class CheckpointStore:
    """Reads and writes the cohort checkpoints of one run."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def save_student(self, step: int, student: str, state: Mapping[str, Any]) -> str:
        """Write one student's state (moved to the CPU) for ``step``; returns where it went."""
        buffer = io.BytesIO()
        torch.save(to_cpu(state), buffer)
        relative = f"{checkpoint_directory(step)}/{student}.pt"
        self.storage.write_bytes(relative, buffer.getvalue())
        return self.storage.describe(relative)

    def load_student(self, step: int, student: str) -> dict[str, Any]:
        """One student's state at ``step``, on the CPU."""
        data = self.storage.read_bytes(f"{checkpoint_directory(step)}/{student}.pt")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def commit(self, manifest: Mapping[str, Any]) -> None:
        """Mark the checkpoint of ``manifest['step']`` complete: every live student's file must already be there."""
        directory = checkpoint_directory(manifest["step"])
        missing = [name for name in manifest["live"] if not self.storage.exists(f"{directory}/{name}.pt")]
        if missing:
            raise RuntimeError(f"checkpoint at step {manifest['step']} lacks the files of {', '.join(missing)}")
        self.storage.write_bytes(f"{directory}/{MANIFEST}", json.dumps({"format": FORMAT, **manifest}, indent=2).encode())

    def complete_steps(self) -> list[int]:
        """Steps that have a complete checkpoint (a manifest), oldest first."""
        steps = []
        for name in self.storage.list_directories(CHECKPOINTS):
            if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
                step = int(name[len(STEP_PREFIX):])
                if self.storage.exists(f"{checkpoint_directory(step)}/{MANIFEST}"):
                    steps.append(step)
        return sorted(steps)

    def latest(self) -> dict[str, Any] | None:
        """The manifest of the newest complete checkpoint, or None when there is none."""
        steps = self.complete_steps()
        if not steps:
            return None
        name = f"{checkpoint_directory(steps[-1])}/{MANIFEST}"
        manifest = json.loads(self.storage.read_bytes(name))
        if manifest.get("format", 1) > FORMAT:
            raise ConfigError("run directory", f"{self.storage.describe(name)} is in format {manifest['format']}, newer "
                              f"than this rdml-dist reads ({FORMAT}): continue it with the rdml-dist that wrote it")
        return manifest

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove older ones and interrupted ones older than the newest."""
        complete = self.complete_steps()
        if not complete:
            return
        kept = set(complete[-keep:])
        for name in self.storage.list_directories(CHECKPOINTS):
            suffix = name[len(STEP_PREFIX):]
            if name.startswith(STEP_PREFIX) and suffix.isdigit() and int(suffix) not in kept and int(suffix) < complete[-1]:
                self.storage.delete(f"{CHECKPOINTS}/{name}")
