"""The messages students and the coordinator exchange, independent of the transport that carries them.

A transport that writes a message as named fields (the frame lane's JSON header) takes them from
:func:`scalar_fields` and builds the message back with :func:`from_fields`, so the field names are
defined here once.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

M = TypeVar("M")
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@functools.cache
def field_table(kind: type) -> tuple[Field[Any], ...]:
    """``dataclasses.fields(kind)``, read once per message class: the transports name every frame's fields (about
    5 µs a call, several calls a frame, on the coordinator's one loop)."""
    return fields(kind)


@dataclass
class StudentInfo:
    """What a student tells the coordinator when it joins; must agree across the cohort."""

    name: str
    num_train: int
    num_val: int
    num_classes: int
    steps_per_epoch: int
    data_fingerprint: str = ""  # labels and a sample of inputs (see rdml_dist.data.fingerprint); "" = not given


@dataclass
class StepMeasures:
    """What a student measured of one completed step and the coordinator cannot see: its compute, its exchange's
    round trip. It travels in the student's next frame (``previous``), or alone at a chunk's end.

    The one road for such a value: each field but ``step`` lands in the ``StepRecord`` field of its name (a column
    of the step log) and in its histogram of ``rdml_dist.metrics.MEASURE_METRICS``; ``tests/unit/test_coordinator.py``
    fails while either is missing. The frame lane and the gRPC service carry every field by name.
    """

    step: int
    compute_seconds: float
    round_trip_seconds: float

    def values(self) -> dict[str, float]:
        """The measured values by name (every field but ``step``)."""
        return {item.name: getattr(self, item.name) for item in field_table(type(self)) if item.name != "step"}


@dataclass
class LogitsFrame:
    """One student's output for one training step.

    ``step`` is the global step (epoch·steps_per_epoch + step in epoch) and ``batch_hash`` the
    hash of the batch's sample indices: the coordinator rejects a frame whose step or batch
    differs from the cohort's. ``previous`` reports the student's last completed step as it
    measured it (the coordinator cannot see the transport's cost or the backward pass).
    """

    student: str
    step: int
    batch_hash: str
    logits: Tensor
    ce_loss: float
    correct: int
    labelled: int
    correct_clean: int  # samples of the whole batch whose argmax equals the true label (noise and hiding ignored)
    previous: StepMeasures | None = None


@dataclass
class MimicryReply:
    """The coordinator's answer: the full mimicry gradient w.r.t. the student's logits.

    ``grad`` already includes λ·τ², so the student adds it to its cross-entropy backward and
    needs to know nothing about the divergence, α or the peers.
    """

    step: int
    grad: Tensor
    mimicry_loss: float
    alpha: float
    weight: float
    live_students: int
    refresh: bool = False  # sequential update: send this step's logits again after applying (later peers read them)


@dataclass
class EvalFrame:
    """A student's validation logits for one epoch; the labels let the coordinator check consistency."""

    student: str
    epoch: int
    logits: Tensor
    labels: Tensor
    previous: StepMeasures | None = None


def scalar_fields(message: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """``message``'s fields by name, without its tensors and ``leave_out``; a nested message becomes a mapping."""
    return {
        item.name: scalar_fields(value) if is_dataclass(value) else value
        for item in field_table(type(message))
        if item.name not in leave_out and "Tensor" not in item.type
        for value in [getattr(message, item.name)]
    }


def from_fields(kind: type[M], named: dict[str, Any], **given: Any) -> M:
    """A ``kind`` message from the named fields of :func:`scalar_fields` plus ``given`` (its tensors, its sender).

    Scalars are converted to their field's type; a missing field without a default raises ``KeyError``,
    a value that does not convert ``ValueError`` or ``TypeError``.
    """
    values = dict(given)
    for item in field_table(kind):
        if item.name in given:
            continue
        if item.name not in named:
            if item.default is MISSING:
                raise KeyError(item.name)
            continue
        value = named[item.name]
        if item.type == "StepMeasures | None":
            values[item.name] = None if value is None else from_fields(StepMeasures, value)
        else:
            values[item.name] = _SCALARS[item.type](value)
    return kind(**values)
