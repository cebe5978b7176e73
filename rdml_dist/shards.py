"""Row shards of the coordinator (``runtime.coordinator.shards``): who serves which rows, and joining their answers.

Mimicry targets are per sample, so a step's batch splits exactly by rows: shard ``s`` of ``S``
serves rows ``[s·B//S, (s+1)·B//S)`` of every student's logits. Each shard weights its gradients
and losses by its share of the rows, so a student concatenates the shards' gradients and adds
their losses, and the driver adds the shards' step records, to get what one coordinator computes.
"""

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from rdml_dist.frames import LogitsFrame, MimicryReply

if TYPE_CHECKING:  # the coordinator imports this module
    from rdml_dist.coordinator import StepRecord


def shard_rows(rows: int, shards: int, index: int) -> slice:
    """The rows of a ``rows``-row batch that shard ``index`` of ``shards`` serves (contiguous, sizes differ by ≤ 1)."""
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is outside 0..{shards - 1}")
    return slice(index * rows // shards, (index + 1) * rows // shards)


def split_frame(frame: LogitsFrame, shards: int) -> list[LogitsFrame]:
    """One frame per shard, each with its rows of the logits and the whole frame's other fields."""
    if shards == 1:
        return [frame]
    rows = frame.logits.shape[0]
    return [replace(frame, logits=frame.logits[shard_rows(rows, shards, index)]) for index in range(shards)]


def join_replies(replies: Sequence[MimicryReply]) -> MimicryReply:
    """The reply one coordinator would give: the shards' gradients in row order, their weighted losses added."""
    if len(replies) == 1:
        return replies[0]
    first = replies[0]
    return replace(first, grad=torch.cat([reply.grad for reply in replies]), mimicry_loss=sum(reply.mimicry_loss for reply in replies))


def merge_records(per_shard: Sequence[list["StepRecord"]]) -> list["StepRecord"]:
    """Each (step, student)'s record over all shards: losses and rows added, waits and computation times the
    longest (the shards compute side by side); the rest as the first shard, which also holds the timings."""
    if len(per_shard) == 1:
        return per_shard[0]
    merged = {(record.step, record.student): replace(record) for record in per_shard[0]}
    for records in per_shard[1:]:
        for record in records:
            total = merged.get((record.step, record.student))
            if total is None:
                raise RuntimeError(f"coordinator shards disagree: step {record.step} of {record.student!r} is missing on shard 0")
            total.mimicry_loss += record.mimicry_loss
            total.divergence += record.divergence
            total.rows += record.rows
            total.wait_seconds = max(total.wait_seconds, record.wait_seconds)
            total.coordinator_seconds = max(total.coordinator_seconds, record.coordinator_seconds)
    return list(merged.values())
