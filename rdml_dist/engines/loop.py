"""The one epoch loop every engine runs: steps in chunks, evaluation, checkpoints, rollbacks.

A run is a sequence of chunks of steps. A chunk ends at every checkpoint point (each
``runtime.checkpoint.every_steps`` steps and every epoch end); after it the driver scores the
epoch when one ended, rewrites the results and commits a cohort checkpoint. A fresh run starts
with a checkpoint at step 0 and ``--resume`` starts from the latest one, through the same code.
An engine's cohort raises :class:`CohortRollback` when a failure is to be answered by going
back to the latest complete checkpoint; the loop does that and carries on.
"""

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from tqdm import tqdm

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.controller import DriverStates
from rdml_dist.engines.failure_policy import Failure, FailurePolicy, RunFailed
from rdml_dist.engines.failures import FailureKind, one_line
from rdml_dist.engines.progress import describe_epoch
from rdml_dist.logs import logger
from rdml_dist.messages import DriverState, EpochEvaluation, StepRecord
from rdml_dist.run_records.run_directory import RunDirectory


class CohortRollback(Exception):
    """The cohort must go back to its latest complete checkpoint (``event`` says why; ``earlier`` holds the fault
    events met before it in the stopped work, which the rollback must not lose)."""

    def __init__(self, event: dict[str, Any], earlier: list[dict[str, Any]] | None = None) -> None:
        super().__init__(event.get("cause", "rollback"))
        self.event = event
        self.earlier = list(earlier or [])


class StorageFailed(Exception):
    """The run's storage failed (``cause``) in the driver's own reads and writes of the run's files at ``step``."""

    def __init__(self, cause: OSError, step: int) -> None:
        super().__init__(one_line(cause))
        self.cause = cause
        self.step = step


@contextlib.contextmanager
def _storage(step: int) -> Iterator[None]:
    """The driver's own work on the run's files at ``step``: an ``OSError`` there is the storage failing (a full
    disk, an object store's outage), which the policy answers. The cohort's work is never wrapped: a student's own
    I/O error is its failure, a data file that cannot be read a user's."""
    try:
        yield
    except OSError as error:
        raise StorageFailed(error, step) from error


class Cohort(Protocol):
    """What the loop needs from an engine's students and coordinator."""

    steps_per_epoch: int
    policy: FailurePolicy  # one failure budget for the cohort's failures and the run's storage alike

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

    def restore(self, step: int | None) -> None:
        """Students and coordinator go back to the cohort checkpoint of ``step`` (None: to the initial state,
        after a failure before the step-0 checkpoint was complete)."""

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
    publish_state: Callable[[DriverState], None] | None = None,
) -> RunDirectory:
    """Train from ``start`` (a checkpoint manifest; None for a fresh run) to the last epoch.

    The loop is the driver's state machine (:class:`DriverState`). Every state's work may end in
    :class:`CohortRollback`, the failure policy's decision to go back: then the run's files go back
    to the latest complete checkpoint (rolling back) and the cohort restores it (restoring), which
    may itself fail and roll back again. A failure before the step-0 checkpoint is complete goes
    back to the cohort's initial state and writes that checkpoint again.
    """
    states = DriverStates(publish_state)
    steps_per_epoch = cohort.steps_per_epoch
    total = config.training.epochs * steps_per_epoch
    state, why = DriverState.STARTING, ""
    target: int | None = None if start is None else start["step"]  # the checkpoint the cohort goes back to
    step = restore_step = 0 if target is None else target
    epoch_started = time.perf_counter()
    begun = False
    checkpointed = start is not None  # from then on a complete checkpoint exists: none found is the storage failing
    try:
        with tqdm(total=total, initial=step, disable=not show_progress, unit="step") as bar:
            progress = _progress_callback(bar)
            while state is not DriverState.FINISHING:
                states.enter(state, why)
                try:
                    if state is DriverState.STARTING:
                        if target is None:
                            if not begun:  # once: a second start (after a failure before step 0's checkpoint) keeps the events
                                run.write_config()
                                begun = True
                            _checkpoint(config, cohort, run, checkpoints, 0)
                            checkpointed = True
                            state = DriverState.RUNNING
                        else:
                            state = DriverState.RESTORING
                    elif state is DriverState.RESTORING:
                        cohort.restore(target)
                        restore_step = step = target or 0
                        bar.n = step
                        bar.refresh()
                        state, why = (DriverState.STARTING if target is None else DriverState.RUNNING), ""
                        epoch_started = time.perf_counter()
                    elif state is DriverState.RUNNING:
                        if step >= total:
                            state = DriverState.FINISHING
                            continue
                        end = next_boundary(step, steps_per_epoch, config.runtime.checkpoint.every_steps)
                        entry = _run_chunk(config, cohort, run, checkpoints, step, end, restore_step, progress, observers,
                                           epoch_started)
                        if entry is not None:
                            bar.set_postfix_str(describe_epoch(entry))
                            epoch_started = time.perf_counter()
                        restore_step = step = end
                        progress(step)
                    elif state is DriverState.ROLLING_BACK:
                        with _storage(step):
                            manifest = checkpoints.latest()
                            if manifest is None and checkpointed:
                                raise FileNotFoundError(f"no complete checkpoint found in {checkpoints.storage.describe()}")
                            if manifest is not None:
                                run.rollback(manifest)
                        target = None if manifest is None else manifest["step"]
                        state = DriverState.RESTORING
                except CohortRollback as rollback:
                    state, why = _rolling_back(run, cohort, checkpoints, rollback, checkpointed)
                except StorageFailed as failed:
                    state, why = _rolling_back(run, cohort, checkpoints, _storage_failed(cohort.policy, failed), checkpointed)
            states.enter(DriverState.FINISHING)
    except BaseException as error:
        # the faults that stopped the run, and those the cohort still held, belong in its results like any other
        _add_events(run, [*cohort.pop_events(), *(error.events if isinstance(error, RunFailed) else [])])
        states.enter(DriverState.FAILED, f"{type(error).__name__}: {error}")
        raise
    return run


def _storage_failed(policy: FailurePolicy, failed: StorageFailed) -> CohortRollback:
    """The policy counts the storage's failure against the budget (raising :class:`RunFailed` past it, or under
    ``fail``), and the cohort goes back to its latest checkpoint."""
    failure = Failure(FailureKind.STORAGE_ERROR.value, failed.step, one_line(failed.cause))
    policy.decide(failure)
    return CohortRollback(failure.event())


def _rolling_back(
    run: RunDirectory, cohort: Cohort, checkpoints: CheckpointStore, rollback: CohortRollback, checkpointed: bool
) -> tuple[DriverState, str]:
    """Record why the cohort goes back (and what it met before), naming where to: the state the loop moves to.

    Where the latest checkpoint cannot be read now, the rolling back reads it again (and fails through the policy).
    """
    try:
        latest = checkpoints.latest()
        where = f"step {latest['step']}" if latest else "the latest checkpoint (none found)" if checkpointed else "the initial state"
    except OSError as error:
        where = f"the latest checkpoint ({one_line(error)})"
    _add_events(run, [*cohort.pop_events(), *rollback.earlier, {**rollback.event, "action": f"rolled back to {where}"}])
    return DriverState.ROLLING_BACK, str(rollback)


def _add_events(run: RunDirectory, events: list[dict[str, Any]]) -> None:
    """Fault events into the results. A write that fails now (storage down, the lease lost) keeps them in memory for
    the next rewrite and must not replace the error being handled; a lost lease still stops the run at its next write."""
    try:
        run.add_events(events)
    except Exception as error:  # noqa: BLE001 - see above
        logger.warning(f"results.json not rewritten now ({one_line(error)}); its fault events are kept for the next rewrite")


def _run_chunk(
    config: ExperimentConfig, cohort: Cohort, run: RunDirectory, checkpoints: CheckpointStore, step: int, end: int,
    restore_step: int, progress: Callable[[int], None], observers: Sequence[RunObserver], epoch_started: float,
) -> dict[str, Any] | None:
    """Steps ``[step, end)``, their records, the epoch's score when it ends there, and the checkpoint of ``end``.

    Returns the epoch's results entry when the chunk closed an epoch.
    """
    steps_per_epoch = cohort.steps_per_epoch
    events = cohort.run_steps(step, end, restore_step, progress)
    with _storage(end):
        run.add_events(events)
    run.add_records(cohort.pop_records(end))
    entry = None
    if end % steps_per_epoch == 0:
        epoch = end // steps_per_epoch - 1
        evaluation = cohort.evaluate(epoch)
        with _storage(end):
            entry = run.record_epoch(epoch, evaluation, time.perf_counter() - epoch_started)
    manifest = _checkpoint(config, cohort, run, checkpoints, end)
    for observer in observers:
        if entry is not None:
            observer.on_epoch(entry)
        observer.on_checkpoint(end, manifest)
    return entry


def _checkpoint(
    config: ExperimentConfig, cohort: Cohort, run: RunDirectory, checkpoints: CheckpointStore, step: int
) -> dict[str, Any]:
    """Students write their files, then the results, then the manifest that makes the checkpoint complete.

    The driver's lease is checked before the students write theirs (they write through storage of their own).
    """
    with _storage(step):
        checkpoints.storage.check_writable()
    cohort.save_checkpoint(step)
    with _storage(step):
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
