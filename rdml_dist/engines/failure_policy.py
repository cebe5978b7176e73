"""What to do when a student or the coordinator fails: roll the cohort back, carry on without it, or stop.

Modelled on Ray Train's controller: the Ray cohort notices a failure, :func:`~rdml_dist.engines.failures.classify`
names its kind, the policy decides, and the controller acts on the decision. The policy also
keeps the failure budget (``runtime.fault.max_failures``), so a run that keeps failing ends with
every cause listed. A user error (config, data contract, a model factory that fails) ends the run
at once: no restart can cure it.
"""

import enum
from dataclasses import asdict, dataclass

from rdml_dist.config import FaultConfig
from rdml_dist.config.schema import OnStudentFailure
from rdml_dist.engines.failures import FailureKind

WHAT_HAPPENED = {
    FailureKind.USER_ERROR: "cannot run",
    FailureKind.STUDENT_DIED: "died",
    FailureKind.STUDENT_ERROR: "failed",
    FailureKind.STUDENT_SILENT: "went silent",
    FailureKind.COORDINATOR_DIED: "died",
    FailureKind.COORDINATOR_ERROR: "failed",
    FailureKind.TIMEOUT: "timed out",
    FailureKind.STORAGE_ERROR: "failed",
}


class Decision(enum.Enum):
    RESTART_COHORT = "restart_cohort"  # every student and the coordinator go back to the latest checkpoint
    CONTINUE = "continue"  # the live students go on; the restarted student rejoins from the latest checkpoint


@dataclass(frozen=True)
class Failure:
    """One failure as the driver saw it: its kind (a :class:`FailureKind` value), the failing step, the cause."""

    kind: str
    step: int
    cause: str
    student: str | None = None
    node: str | None = None

    @property
    def failure_kind(self) -> FailureKind:
        return FailureKind(self.kind)

    def describe(self) -> str:
        if self.student:
            where = f"student {self.student!r}" + (f" on node {self.node}" if self.node else "")  # an external one has none
        else:
            where = "the run's storage" if self.failure_kind is FailureKind.STORAGE_ERROR else "the coordinator"
        return f"{where} {WHAT_HAPPENED[self.failure_kind]} at step {self.step}: {self.cause}"

    def event(self) -> dict[str, object]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class RunFailed(RuntimeError):
    """The failure policy stopped the run; the message names what failed, where and why.

    ``events`` are the fault events that led here and were not yet in the run's results (the failure that
    stopped the run among them), so a failed run's ``results.json`` lists every fault too.
    """

    def __init__(self, message: str, failure: "Failure | None" = None) -> None:
        super().__init__(message)
        self.events: list[dict[str, object]] = [] if failure is None else [{**failure.event(), "action": "the run stopped"}]


class FailurePolicy:
    """Decides per failure and counts them against the budget."""

    def __init__(self, fault: FaultConfig) -> None:
        self.fault = fault
        self.failures: list[Failure] = []

    @property
    def restarts_processes(self) -> bool:
        """Whether a dead process is restarted (by Ray) at all: under ``fail`` the first failure ends the run."""
        return self.fault.on_student_failure is not OnStudentFailure.FAIL

    def decide(self, failure: Failure) -> Decision:
        """The decision for ``failure``; raises :class:`RunFailed` when the run must stop."""
        if failure.failure_kind is FailureKind.USER_ERROR:
            raise RunFailed(failure.describe(), failure)
        self.failures.append(failure)
        if self.fault.on_student_failure is OnStudentFailure.FAIL:
            raise RunFailed(f"{failure.describe()} (runtime.fault.on_student_failure is 'fail')", failure)
        if len(self.failures) > self.fault.max_failures:
            causes = "; ".join(f"{number}. {item.describe()}" for number, item in enumerate(self.failures, 1))
            raise RunFailed(f"{len(self.failures)} failures, more than runtime.fault.max_failures={self.fault.max_failures}: {causes}",
                            failure)
        if failure.failure_kind.of_a_student and self.fault.on_student_failure is OnStudentFailure.CONTINUE:
            return Decision.CONTINUE
        return Decision.RESTART_COHORT
