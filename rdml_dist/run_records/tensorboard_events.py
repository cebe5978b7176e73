"""TensorBoard event files of a run, under ``{run_dir}/tensorboard/``: one point per epoch for every scalar.

Written with ``tensorboardX`` (small, pure Python, the writer Ray Tune uses too), read by any
TensorBoard. The x axis is the epoch. Every session of a run (the first, and each ``--resume``)
writes its own event file, whose first record is a ``SessionLog.START`` at the first epoch it
writes (TensorBoard's ``purge_step``): readers drop what an earlier session wrote from that epoch
on, so an epoch scored again after a crash is seen once. A resumed session writes the last epoch
of its checkpoint again, in case the crash came between the checkpoint and the event file's flush.

Event files live on local disk; on an object store (``s3://`` …) the file is staged in a local
directory and uploaded whole after each epoch, as it is small (a few dozen scalars per epoch).
"""

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from rdml_dist.run_records.run_directory import TENSORBOARD_DIR
from rdml_dist.run_records.storage import Storage

# results.json's per-student keys -> the scalar's name under student/<name>/
STUDENT_SCALARS = {
    "val_accuracy": "val_accuracy",
    "train_accuracy": "train_accuracy",
    "train_ce": "ce_loss",
    "train_mimicry": "mimicry_loss",
    "train_divergence": "divergence",
    "compute_seconds": "compute_seconds",
    "wait_seconds": "wait_seconds",
    "exchange_overhead_seconds": "exchange_overhead_seconds",
}


def epoch_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """An epoch's row of ``results.json`` as flat scalar names (``ensemble/val_accuracy``,
    ``student/<name>/val_accuracy``, ``cohort/alpha`` …); unknown (None/NaN) values are left out."""
    scalars = {
        "ensemble/val_accuracy": entry.get("ensemble_val_accuracy"),
        "cohort/alpha": entry.get("alpha"),
        "cohort/mimicry_weight": entry.get("mimicry_weight"),
        "cohort/epoch_seconds": entry.get("seconds"),
    }
    for student, values in entry["students"].items():
        for key, name in STUDENT_SCALARS.items():
            scalars[f"student/{student}/{name}"] = values.get(key)
    return {name: float(value) for name, value in scalars.items() if value is not None and not math.isnan(value)}


def _add_epoch(writer: SummaryWriter, entry: dict[str, Any]) -> None:
    for name, value in epoch_scalars(entry).items():
        writer.add_scalar(name, value, global_step=entry["epoch"])


class TensorBoardObserver:
    """A :class:`~rdml_dist.engines.loop.RunObserver` that writes every scored epoch to the run's TensorBoard events."""

    def __init__(self, storage: Storage, epochs_done: list[dict[str, Any]]) -> None:
        """``epochs_done``: the epochs the run's checkpoint already holds (empty for a fresh run).

        Nothing is written before the first epoch is scored: a run that never gets going leaves no files.
        """
        self.storage = storage
        self.epochs_done = epochs_done
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self.writer: SummaryWriter | None = None

    def _open(self) -> SummaryWriter:
        """This session's event file, starting (and purging earlier sessions' events) at its first epoch."""
        if not self.storage.is_local:
            self._staging = tempfile.TemporaryDirectory(prefix="rdml-tensorboard-")
        directory = self.storage.path(TENSORBOARD_DIR) if self._staging is None else self._staging.name
        first_epoch = self.epochs_done[-1]["epoch"] if self.epochs_done else 0
        suffix = f".{os.getpid()}.from-epoch-{first_epoch}"
        writer = SummaryWriter(directory, purge_step=first_epoch, flush_secs=5, filename_suffix=suffix)
        if self.epochs_done:  # again: the crash may have come between its checkpoint and the flush
            _add_epoch(writer, self.epochs_done[-1])
        return writer

    @property
    def location(self) -> str:
        """Where TensorBoard finds the events (``tensorboard --logdir`` this)."""
        return self.storage.describe(TENSORBOARD_DIR)

    def on_epoch(self, entry: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = self._open()
        _add_epoch(self.writer, entry)
        self.writer.flush()
        self._upload()

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        """Nothing to do: every epoch is flushed (and uploaded) as it is written."""

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self._upload()
        if self._staging is not None:
            self._staging.cleanup()

    def _upload(self) -> None:
        """Copy the staged event file into the run's storage (object stores only)."""
        if self._staging is None:
            return
        for path in Path(self._staging.name).glob("events.out.tfevents.*"):
            self.storage.write_bytes(f"{TENSORBOARD_DIR}/{path.name}", path.read_bytes())
