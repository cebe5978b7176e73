"""Why a request was refused: one short code per cause, the same on every transport.

The core raises :class:`~rdml_dist.errors.FrameRejected` with a code, the gRPC servicer answers
with the code's status and puts the code in the trailing metadata (``rdml-reason``), the frame
lane sends the code in its error header, and the metrics count refused frames by code.
"""

from dataclasses import dataclass

REASON_KEY = "rdml-reason"  # the gRPC trailing-metadata key that carries a refusal's code

UNKNOWN_STUDENT = "unknown_student"
NOT_LIVE = "not_live"
WRONG_STEP = "wrong_step"
DUPLICATE = "duplicate"
BATCH_MISMATCH = "batch_mismatch"
WRONG_SHAPE = "wrong_shape"
NON_FINITE = "non_finite"  # sends a student back to its last checkpoint
DATA_MISMATCH = "data_mismatch"
BAD_TENSOR = "bad_tensor"  # a frame whose tensor a transport could not decode
INVALID = "invalid"  # any other malformed request
NOT_EXTERNAL = "not_external"  # a Ray student tried to join over gRPC
HALTED = "halted"  # the cohort is rolling back or the step failed: every waiting student gets it
TIMEOUT = "timeout"  # the step did not complete within the exchange timeout
UNAUTHENTICATED = "unauthenticated"  # the frame lane's hello lacked a valid proof of the student's key


@dataclass(frozen=True)
class Reason:
    """A refusal's code, the gRPC status it is answered with, and whether it refuses one student's frame."""

    code: str
    grpc_status: str  # a ``grpc.StatusCode`` member's name
    refuses_frame: bool


REASONS: dict[str, Reason] = {reason.code: reason for reason in (
    Reason(UNKNOWN_STUDENT, "NOT_FOUND", True),
    Reason(NOT_LIVE, "FAILED_PRECONDITION", True),
    Reason(WRONG_STEP, "FAILED_PRECONDITION", True),
    Reason(DUPLICATE, "ALREADY_EXISTS", True),
    Reason(BATCH_MISMATCH, "FAILED_PRECONDITION", True),
    Reason(WRONG_SHAPE, "INVALID_ARGUMENT", True),
    Reason(NON_FINITE, "INVALID_ARGUMENT", True),
    Reason(DATA_MISMATCH, "FAILED_PRECONDITION", True),
    Reason(BAD_TENSOR, "INVALID_ARGUMENT", True),
    Reason(INVALID, "INVALID_ARGUMENT", False),
    Reason(NOT_EXTERNAL, "FAILED_PRECONDITION", False),
    Reason(HALTED, "ABORTED", False),
    Reason(TIMEOUT, "DEADLINE_EXCEEDED", False),
    Reason(UNAUTHENTICATED, "UNAUTHENTICATED", False),
)}
REJECTION_REASONS = tuple(code for code, reason in REASONS.items() if reason.refuses_frame)  # the metrics' labels
