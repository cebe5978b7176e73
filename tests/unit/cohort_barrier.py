"""A coordinator's barrier with every student of its config registered, and frames of the shared batch plan:
what the barrier's unit tests start from."""

import torch

from rdml_dist.config import ExperimentConfig
from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.messages import LogitsFrame, StudentInfo


def registered_barrier(config: ExperimentConfig, num_train: int, classes: int, steps_per_epoch: int) -> CohortBarrier:
    """The barrier of ``config`` once each of its students has registered (``num_train`` samples, ``classes``)."""
    barrier = CohortBarrier(config)
    for name in config.student_names():
        barrier.register(StudentInfo(name, num_train, 4, classes, steps_per_epoch=steps_per_epoch))
    return barrier


def planned_frame(name: str, step: int, logits: torch.Tensor, labelled: int, num_train: int, steps_per_epoch: int) -> LogitsFrame:
    """Student ``name``'s frame of ``step``: ``logits`` for the batch the plan (seed 0) gives that step."""
    plan = batch_plan(num_train, logits.shape[0], 0, step // steps_per_epoch)
    return LogitsFrame(name, step, indices_hash(plan[step % steps_per_epoch]), logits, 1.0, 1, labelled, 1)
