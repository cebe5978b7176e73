"""The message vocabulary of a cohort, defined once for every transport: records, frames and replies,
refusal reasons, wire dtypes, the driver's states. No torch import (tensors are only annotated), so any module may use it."""

from rdml_dist.messages.dtypes import WIRE_DTYPES, WireDtype, torch_dtype, wire_dtype
from rdml_dist.messages.frames import (
    EvalFrame,
    LogitsFrame,
    MimicryReply,
    StepMeasures,
    StudentInfo,
    from_fields,
    scalar_fields,
)
from rdml_dist.messages.reasons import (
    BAD_TENSOR,
    BATCH_MISMATCH,
    DATA_MISMATCH,
    DUPLICATE,
    HALTED,
    INVALID,
    NON_FINITE,
    NOT_EXTERNAL,
    NOT_LIVE,
    REASON_KEY,
    REASONS,
    REJECTION_REASONS,
    TIMEOUT,
    UNAUTHENTICATED,
    UNKNOWN_STUDENT,
    WRONG_SHAPE,
    WRONG_STEP,
    Reason,
)
from rdml_dist.messages.records import EpochEvaluation, StepRecord
from rdml_dist.messages.states import DriverState

__all__ = [
    "BAD_TENSOR", "BATCH_MISMATCH", "DATA_MISMATCH", "DUPLICATE", "HALTED", "INVALID", "NON_FINITE", "NOT_EXTERNAL",
    "NOT_LIVE", "REASONS", "REASON_KEY", "REJECTION_REASONS", "TIMEOUT", "UNAUTHENTICATED", "UNKNOWN_STUDENT",
    "WIRE_DTYPES", "WRONG_SHAPE", "WRONG_STEP", "DriverState", "EpochEvaluation", "EvalFrame", "LogitsFrame", "MimicryReply",
    "Reason", "StepRecord", "StepMeasures", "StudentInfo", "WireDtype", "from_fields", "scalar_fields", "torch_dtype",
    "wire_dtype",
]
