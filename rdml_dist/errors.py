"""Exceptions with messages meant for the person running a cohort."""

from rdml_dist.messages.reasons import INVALID


class ConfigError(ValueError):
    """Invalid configuration values; the message is one ``field: problem`` line per problem.

    Raised before anything is launched so that a bad config never costs a cluster allocation.
    ``field`` and ``problem`` are the first problem's; ``problems`` lists them all.
    """

    def __init__(self, field: str, problem: str, more: list[tuple[str, str]] | None = None) -> None:
        self.problems = [(field, problem), *(more or [])]
        self.field = field
        self.problem = problem
        super().__init__("\n".join(f"{where}: {what}" for where, what in self.problems))

    @classmethod
    def combine(cls, errors: list["ConfigError"]) -> "ConfigError":
        """One error carrying every problem of ``errors`` (which must not be empty), in order."""
        problems = [problem for error in errors for problem in error.problems]
        return cls(*problems[0], more=problems[1:])

    def __reduce__(self) -> tuple[type["ConfigError"], tuple[str, str, list[tuple[str, str]]]]:
        """Survive pickling, so an error raised inside a Ray actor reaches the driver as itself."""
        return (type(self), (self.field, self.problem, self.problems[1:]))


class FrameRejected(ValueError):
    """A student's exchange frame is invalid (shape, step, batch hash, non-finite values, unknown sender).

    Rejection is per frame: the other students' frames for the same step are unaffected.
    ``reason`` is a code of :mod:`rdml_dist.messages.reasons` (``non_finite``, ``wrong_step`` …) a
    transport maps to its status code and a student can act on.
    """

    def __init__(self, message: str, reason: str = INVALID) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type["FrameRejected"], tuple[str, str]]:
        return (type(self), (str(self), self.reason))


class CohortStepFailed(RuntimeError):
    """The coordinator could not complete a step (its computation raised, or the cohort is rolling back).

    Every student waiting at that step receives it at once, instead of waiting out the exchange timeout.
    """


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the cohort (unreachable, refuses us, too small); the message says what to do."""


class ExternalStudentsMissing(ClusterError):
    """External students did not join the cohort service in time: at the start the run cannot begin; after a
    coordinator restart it is a timeout like any other, handed to the policy."""


class CoordinatorUnreachable(ConnectionError):
    """A student's direct connection to the coordinator broke or was refused: it died, restarted or moved.

    The driver treats it like an actor call to a dead coordinator: a failure of the cohort, handed to the policy.
    """


class StudentRestarted(RuntimeError):
    """A student's process was restarted by Ray and has not been restored: a call that reaches it is refused.

    Ray passes calls made after a death to the new process; without this one would train a fresh model silently.
    The driver treats it as the student's death.
    """
