"""Row shards of the coordinator (``runtime.coordinator.shards``): who serves which rows, and joining their answers.

Mimicry targets are per sample, so a step's batch splits exactly by rows: shard ``s`` of ``S``
serves rows ``[s·B//S, (s+1)·B//S)`` of every student's logits. Each shard weights its gradients
by its share of the rows, so a student concatenates them; losses are means over a shard's rows, so
the student and the driver average the shards' losses and step records by rows. Either way the
result is what one coordinator computes. A frame holding NaN/inf anywhere is poisoned in every
part, so that all shards refuse it together.
"""

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from rdml_dist.finite import all_finite
from rdml_dist.messages import LogitsFrame, MimicryReply, StepRecord


def shard_rows(rows: int, shards: int, index: int) -> slice:
    """The rows of a ``rows``-row batch that shard ``index`` of ``shards`` serves (contiguous, sizes differ by ≤ 1)."""
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} is outside 0..{shards - 1}")
    return slice(index * rows // shards, (index + 1) * rows // shards)


def split_frame(frame: LogitsFrame, shards: int) -> list[LogitsFrame]:
    """One frame per shard, each with its rows of the logits and the whole frame's other fields.

    A non-finite value in any row makes every part non-finite: each shard checks only its own rows,
    and a frame refused by some shards and used by others would split the cohort's step.
    """
    if shards == 1:
        return [frame]
    logits = frame.logits
    if not all_finite(logits):
        logits = torch.full_like(logits, math.nan)
    return [replace(frame, logits=logits[shard_rows(logits.shape[0], shards, index)]) for index in range(shards)]


def join_replies(replies: Sequence[MimicryReply]) -> MimicryReply:
    """The reply one coordinator would give: the shards' gradients in row order, their losses averaged by rows."""
    if len(replies) == 1:
        return replies[0]
    loss = _mean_by_rows([(reply.mimicry_loss, reply.grad.shape[0]) for reply in replies])
    return replace(replies[0], grad=torch.cat([reply.grad for reply in replies]), mimicry_loss=loss)


def merge_records(per_shard: Sequence[list[StepRecord]]) -> list[StepRecord]:
    """Each (step, student)'s record over all shards: losses averaged and rows added, waits and computation
    times the longest (the shards compute side by side); the rest as the first shard, which holds the timings.

    A record missing on some shard is of a step its student did not complete (it died while sending its
    parts): it is left out, as one coordinator would have no record of it.
    """
    if len(per_shard) == 1:
        return per_shard[0]
    keyed = [{(record.step, record.student): record for record in records} for records in per_shard]
    merged = []
    for key, first in keyed[0].items():
        parts = [records.get(key) for records in keyed]
        if any(part is None for part in parts):
            continue
        merged.append(replace(
            first,
            mimicry_loss=_mean_by_rows([(part.mimicry_loss, part.rows) for part in parts]),
            divergence=_mean_by_rows([(part.divergence, part.rows) for part in parts]),
            rows=sum(part.rows for part in parts),
            wait_seconds=max(part.wait_seconds for part in parts),
            coordinator_seconds=max(part.coordinator_seconds for part in parts),
        ))
    return merged


def _mean_by_rows(values_and_rows: Sequence[tuple[float, int]]) -> float:
    """The batch mean from the shards' means over their rows."""
    return sum(value * rows for value, rows in values_and_rows) / sum(rows for _, rows in values_and_rows)
