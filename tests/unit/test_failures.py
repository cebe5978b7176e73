"""Every error is classified once, without Ray: user error, student failure, coordinator failure or timeout."""

import pytest

from rdml_dist.config import FaultConfig
from rdml_dist.engines.failure_policy import Decision, Failure, FailurePolicy, RunFailed
from rdml_dist.engines.failures import COORDINATOR, CoordinatorReplaced, FailureKind, ProcessDied, classify, one_line
from rdml_dist.errors import CohortStepFailed, ConfigError, CoordinatorUnreachable, FrameRejected, StudentRestarted


@pytest.mark.parametrize(("cause", "source", "kind"), [
    (ConfigError("students.0", "could not be built"), "a", FailureKind.USER_ERROR),
    (FrameRejected("student 'b' has num_train=3 but 'a' has 4", "data_mismatch"), "a", FailureKind.USER_ERROR),
    (TimeoutError("no answer"), "a", FailureKind.TIMEOUT),
    (TimeoutError("epoch 0 was not scored"), COORDINATOR, FailureKind.TIMEOUT),
    (ProcessDied("a", "ActorDiedError"), "a", FailureKind.STUDENT_DIED),
    (ProcessDied(COORDINATOR, "ActorDiedError"), "a", FailureKind.COORDINATOR_DIED),
    (StudentRestarted("student 'a' was restarted"), "a", FailureKind.STUDENT_DIED),
    (CoordinatorReplaced("restarted"), COORDINATOR, FailureKind.COORDINATOR_DIED),
    (CoordinatorUnreachable("lane broke"), "a", FailureKind.COORDINATOR_DIED),
    (CohortStepFailed("computation failed"), "a", FailureKind.COORDINATOR_ERROR),
    (FrameRejected("frame for step 3, cohort at 0", "wrong_step"), "a", FailureKind.COORDINATOR_ERROR),
    (RuntimeError("CUDA out of memory"), "a", FailureKind.STUDENT_ERROR),
    (OSError("input/output error reading a shard"), "a", FailureKind.STUDENT_ERROR),
    (KeyError("a bug in a user's model"), "a", FailureKind.STUDENT_ERROR),
    (RuntimeError("a bug in the coordinator"), COORDINATOR, FailureKind.COORDINATOR_ERROR),
])
def test_every_cause_has_one_kind(cause: BaseException, source: str, kind: FailureKind) -> None:
    assert classify(cause, source) is kind


def test_the_policy_decides_by_kind_and_ends_a_run_on_a_user_error() -> None:
    own = Failure(FailureKind.STUDENT_ERROR.value, 5, one_line(RuntimeError("CUDA out of memory\nmore")), student="a", node="n")
    assert own.describe() == "student 'a' on node n failed at step 5: RuntimeError: CUDA out of memory"
    assert FailurePolicy(FaultConfig(on_student_failure="continue")).decide(own) is Decision.CONTINUE
    timeout = Failure(FailureKind.TIMEOUT.value, 5, "TimeoutError: no answer", student="a", node="n")
    assert FailurePolicy(FaultConfig(on_student_failure="continue")).decide(timeout) is Decision.RESTART_COHORT
    user = Failure(FailureKind.USER_ERROR.value, 0, "ConfigError: students.0: could not be built", student="a", node="n")
    policy = FailurePolicy(FaultConfig(max_failures=10))
    with pytest.raises(RunFailed, match="cannot run at step 0: ConfigError: students.0: could not be built"):
        policy.decide(user)
    assert policy.failures == []  # not a failure to retry: nothing counted against the budget
