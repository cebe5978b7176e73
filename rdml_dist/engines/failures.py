"""Every error the driver meets, classified once: user error, student failure, coordinator failure, timeout or
the run's storage failing.

No Ray here: the Ray cohort turns Ray's wrappers into plain causes (:class:`ProcessDied` for a
process Ray reports dead, the task's own exception otherwise) and :func:`classify` decides what
kind of failure each is. The failure policy then decides what the cohort does about it.
"""

import enum

from rdml_dist.errors import ClusterError, CohortStepFailed, ConfigError, CoordinatorUnreachable, FrameRejected, StudentRestarted
from rdml_dist.messages import DATA_MISMATCH, UNKNOWN_STUDENT

COORDINATOR = "coordinator"  # the ``source`` of a failure met on a coordinator call
USER_REJECTIONS = (DATA_MISMATCH, UNKNOWN_STUDENT)  # a refusal that no restart can cure: the user's data or config


class FailureKind(str, enum.Enum):
    """What failed. The value is what ``results.json`` and the logs call it."""

    USER_ERROR = "user_error"  # a config or data contract problem, a model factory that fails: the run ends
    STUDENT_DIED = "student_died"  # a student's process died (killed, out of memory, node lost)
    STUDENT_ERROR = "student_error"  # a student's own exception: CUDA OOM, an I/O error in its data, a bug in a model
    STUDENT_SILENT = "student_silent"  # under ``continue``, an external student sent no frame within the exchange timeout
    COORDINATOR_DIED = "coordinator_died"  # a coordinator process died, or was replaced by Ray (a new incarnation)
    COORDINATOR_ERROR = "coordinator_error"  # the coordinator's computation or state failed
    TIMEOUT = "timeout"  # an exchange, evaluation or call did not finish in time
    STORAGE_ERROR = "storage_error"  # the run's files could not be written or read (a full disk, an object store's outage)

    @property
    def of_a_student(self) -> bool:
        return self in (FailureKind.STUDENT_DIED, FailureKind.STUDENT_ERROR, FailureKind.STUDENT_SILENT)


class ProcessDied(Exception):
    """A process of the cohort is gone (Ray's account of an actor's death), ``who`` naming it."""

    def __init__(self, who: str, detail: str) -> None:
        super().__init__(detail)
        self.who = who

    def __reduce__(self) -> tuple[type["ProcessDied"], tuple[str, str]]:
        return (type(self), (self.who, str(self)))


class CoordinatorReplaced(RuntimeError):
    """A control call reached a coordinator process other than the one the driver restored (Ray restarted it
    while idle): its empty state must not answer as if nothing happened."""

    def __reduce__(self) -> tuple[type["CoordinatorReplaced"], tuple[str]]:
        return (type(self), (str(self),))


def classify(cause: BaseException, source: str) -> FailureKind:
    """The kind of failure ``cause`` is, met on a call to ``source`` (a student's name or :data:`COORDINATOR`).

    ``cause`` is the error itself, not a transport's wrapper of it.
    """
    if isinstance(cause, ConfigError) or (isinstance(cause, FrameRejected) and cause.reason in USER_REJECTIONS):
        return FailureKind.USER_ERROR
    if isinstance(cause, TimeoutError):
        return FailureKind.TIMEOUT
    if isinstance(cause, ProcessDied):
        return FailureKind.COORDINATOR_DIED if cause.who == COORDINATOR else FailureKind.STUDENT_DIED
    if isinstance(cause, (CoordinatorReplaced, CoordinatorUnreachable)):
        return FailureKind.COORDINATOR_DIED
    if isinstance(cause, (CohortStepFailed, FrameRejected, ClusterError)):
        return FailureKind.COORDINATOR_ERROR  # the cohort's shared state is broken: only a restore mends it
    if isinstance(cause, StudentRestarted):
        return FailureKind.STUDENT_DIED
    return FailureKind.COORDINATOR_ERROR if source == COORDINATOR else FailureKind.STUDENT_ERROR


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``: how a cause is named in reports and events."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
