"""Exceptions with messages meant for the person running a cohort."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what is allowed.

    Raised before anything is launched so that a bad config never costs a cluster allocation.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self) -> tuple[type["ConfigError"], tuple[str, str]]:
        """Survive pickling, so an error raised inside a Ray actor reaches the driver as itself."""
        return (type(self), (self.field, self.problem))


class FrameRejected(ValueError):
    """A student's exchange frame is invalid (shape, step, batch hash, non-finite values, unknown sender).

    Rejection is per frame: the other students' frames for the same step are unaffected.
    """


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the cohort (unreachable, refuses us, too small); the message says what to do."""
