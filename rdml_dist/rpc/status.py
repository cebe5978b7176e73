"""The cohort's live status: built from the barrier for ``GetStatus``/``WatchStatus``, rendered for ``rdml-dist status``."""

import math
from typing import TYPE_CHECKING

from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2

if TYPE_CHECKING:  # the server side passes the barrier; rendering (rdml-dist status) needs neither it nor torch
    from rdml_dist.coordinator_core.barrier import CohortBarrier


def cohort_phase(barrier: "CohortBarrier") -> int:
    """HALTED while rolling back (or restarted and not yet restored), FORMING until every member has registered, else TRAINING."""
    if barrier.halted is not None:
        return cohort_pb2.COHORT_PHASE_HALTED
    if barrier.unregistered():
        return cohort_pb2.COHORT_PHASE_FORMING
    return cohort_pb2.COHORT_PHASE_TRAINING


def cohort_status(barrier: "CohortBarrier") -> cohort_pb2.CohortStatus:
    """A snapshot of the cohort, taken under the barrier's lock."""
    phase = cohort_phase(barrier)
    config = barrier.config
    with barrier.lock:
        core = barrier.core
        steps_per_epoch = next(iter(core.info.values())).steps_per_epoch if core.info else 0
        latest = list(core.latest.values())
        newest = max(latest, key=lambda record: record.step) if latest else None
        students = []
        for name, student in zip(core.members, config.students):
            record = core.latest.get(name)
            students.append(cohort_pb2.StudentStatus(
                name=name,
                model=student.model,
                external=student.external,
                live=name in core.live,
                last_step=record.step if record else -1,
                ce_loss=record.ce_loss if record else math.nan,
                mimicry_loss=record.mimicry_loss if record else math.nan,
                samples_per_second=core.samples_per_second.get(name, 0.0),
            ))
        status = cohort_pb2.CohortStatus(
            cohort=config.name,
            phase=phase,
            step=core.step,
            epoch=core.step // steps_per_epoch if steps_per_epoch else 0,
            total_steps=config.training.epochs * steps_per_epoch,
            alpha=newest.alpha if newest else config.mimicry.alpha,
            weight=newest.weight if newest else config.mimicry.weight,
            students=students,
            waiting_for=core.waiting_for() if core.info else [],
            driver_state=barrier.driver_state,
        )
        if core.evaluations:
            evaluation = core.evaluations[max(core.evaluations)]
            status.last_evaluation.CopyFrom(cohort_pb2.EpochEvaluation(
                epoch=evaluation.epoch, accuracy=evaluation.accuracy, ensemble_accuracy=evaluation.ensemble_accuracy,
            ))
    return status


def render_status(status: cohort_pb2.CohortStatus) -> str:
    """A readable table of one status snapshot."""
    phase = cohort_pb2.CohortPhase.Name(status.phase).removeprefix("COHORT_PHASE_").lower()
    lines = [
        f"cohort {status.cohort}: {phase}, step {status.step}/{status.total_steps} (epoch {status.epoch}), "
        f"alpha {status.alpha:g}, weight {status.weight:g}; driver {status.driver_state or 'unknown'}",
        f"{'student':<20} {'model':<16} {'where':<8} {'live':<5} {'step':>6} {'ce':>8} {'mimicry':>8} {'samples/s':>10}",
    ]
    for student in status.students:
        lines.append(
            f"{student.name:<20} {student.model[:16]:<16} {'external' if student.external else 'ray':<8} "
            f"{'yes' if student.live else 'no':<5} {student.last_step:>6} {student.ce_loss:>8.4f} "
            f"{student.mimicry_loss:>8.4f} {student.samples_per_second:>10.1f}"
        )
    if status.waiting_for:
        lines.append(f"waiting for: {', '.join(status.waiting_for)}")
    if status.HasField("last_evaluation"):
        evaluation = status.last_evaluation
        scores = ", ".join(f"{name} {accuracy:.2%}" for name, accuracy in sorted(evaluation.accuracy.items()))
        lines.append(f"epoch {evaluation.epoch} val accuracy: {scores}; ensemble {evaluation.ensemble_accuracy:.2%}")
    return "\n".join(lines)
