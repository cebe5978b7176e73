"""The one epoch loop every engine runs: steps in chunks, evaluation, checkpoints, rollbacks.

A run is a sequence of chunks of steps. A chunk ends at every checkpoint point (each
``runtime.checkpoint.every_steps`` steps and every epoch end); after it the driver scores the
epoch when one ended, rewrites the results and commits a cohort checkpoint. A fresh run starts
with a checkpoint at step 0 and ``--resume`` starts from the latest one, through the same code.
An engine's cohort raises :class:`CohortRollback` when a failure is to be answered by going
back to the latest complete checkpoint; the loop does that and carries on.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm import tqdm

from rdml_dist.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.progress import describe_epoch
from rdml_dist.messages import EpochEvaluation, StepRecord
from rdml_dist.run_directory import RunDirectory


class CohortRollback(Exception):
    """The cohort must go back to its latest complete checkpoint (``event`` says why)."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__(event.get("cause", "rollback"))
        self.event = event


class Cohort(Protocol):
    """What the loop needs from an engine's students and coordinator."""

    steps_per_epoch: int

    def run_steps(self, start: int, end: int, restore_step: int, on_progress: Callable[[int], None]) -> list[dict[str, Any]]:
        """Train steps ``[start, end)`` in lock-step; returns fault events handled on the way."""

    def evaluate(self, epoch: int) -> EpochEvaluation:
        """Close the epoch on every live student and score it."""

    def pop_records(self, before_step: int) -> list[StepRecord]:
        """The coordinator's step records before ``before_step``, handed over once."""

    def save_checkpoint(self, step: int) -> None:
        """Every live student writes its own state for ``step`` into the run's storage."""

    def pop_events(self) -> list[dict[str, Any]]:
        """Fault events handled outside a chunk of steps (a student lost while evaluating or checkpointing), once."""

    def restore(self, step: int) -> None:
        """Students and coordinator go back to the cohort checkpoint of ``step``."""

    def live_members(self) -> list[str]:
        """Students currently taking part."""


class RunObserver(Protocol):
    """Something that follows a run from outside the loop: TensorBoard, a Ray Tune trial's reports.

    Observers only read; they are called after the loop has written the results and committed the
    checkpoint, so what they see is what a resumed run would see.
    """

    def on_epoch(self, entry: dict[str, Any]) -> None:
        """An epoch was scored: ``entry`` is its row of ``results.json`` (per-student and ensemble metrics)."""

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        """The cohort checkpoint of ``step`` is complete (``manifest`` is what was committed)."""


def next_boundary(step: int, steps_per_epoch: int, every_steps: int | None) -> int:
    """The end of the chunk starting at ``step``: the next checkpoint point or the epoch's end, whichever is first."""
    epoch_end = (step // steps_per_epoch + 1) * steps_per_epoch
    if every_steps is None:
        return epoch_end
    return min(epoch_end, (step // every_steps + 1) * every_steps)


def train_loop(
    config: ExperimentConfig,
    cohort: Cohort,
    run: RunDirectory,
    checkpoints: CheckpointStore,
    start: dict[str, Any] | None,
    show_progress: bool,
    observers: Sequence[RunObserver] = (),
) -> RunDirectory:
    """Train from ``start`` (a checkpoint manifest; None for a fresh run) to the last epoch."""
    steps_per_epoch = cohort.steps_per_epoch
    total = config.training.epochs * steps_per_epoch
    if start is None:
        run.write_config()
        _checkpoint(config, cohort, run, checkpoints, 0)
        restore_step = step = 0
    else:
        cohort.restore(start["step"])
        restore_step = step = start["step"]
    epoch_started = time.perf_counter()
    with tqdm(total=total, initial=step, disable=not show_progress, unit="step") as bar:
        progress = _progress_callback(bar)
        while step < total:
            end = next_boundary(step, steps_per_epoch, config.runtime.checkpoint.every_steps)
            try:
                run.add_events(cohort.run_steps(step, end, restore_step, progress))
                run.add_records(cohort.pop_records(end))
                if end % steps_per_epoch == 0:
                    epoch = end // steps_per_epoch - 1
                    entry = run.record_epoch(epoch, cohort.evaluate(epoch), time.perf_counter() - epoch_started)
                    bar.set_postfix_str(describe_epoch(entry))
                    epoch_started = time.perf_counter()
                manifest = _checkpoint(config, cohort, run, checkpoints, end)
                if end % steps_per_epoch == 0:
                    for observer in observers:
                        observer.on_epoch(entry)
                for observer in observers:
                    observer.on_checkpoint(end, manifest)
            except CohortRollback as rollback:
                manifest = checkpoints.latest()
                if manifest is None:
                    raise RuntimeError(f"no complete checkpoint to go back to after: {rollback}") from rollback
                run.add_events([{**rollback.event, "action": f"rolled back to step {manifest['step']}"}])
                cohort.restore(manifest["step"])
                run.rollback(manifest)
                restore_step = step = manifest["step"]
                bar.n = step
                bar.refresh()
                continue
            restore_step = step = end
            progress(step)
    return run


def _checkpoint(
    config: ExperimentConfig, cohort: Cohort, run: RunDirectory, checkpoints: CheckpointStore, step: int
) -> dict[str, Any]:
    """Students write their files, then the results, then the manifest that makes the checkpoint complete."""
    cohort.save_checkpoint(step)
    run.add_events(cohort.pop_events())
    run.write_progress()
    manifest = run.manifest(step, cohort.live_members())
    checkpoints.commit(manifest)
    checkpoints.prune(config.runtime.checkpoint.keep)
    return manifest


def _progress_callback(bar: tqdm) -> Callable[[int], None]:
    def advance(step: int) -> None:
        bar.update(max(step - bar.n, 0))

    return advance
