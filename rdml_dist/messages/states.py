"""The driver's states, as the driver logs them and the coordinator shows them (``rdml-dist status``, the
``rdml_driver_state`` metric): vocabulary both sides share, so the coordinator's core imports no engine."""

import enum


class DriverState(str, enum.Enum):
    STARTING = "starting"  # opening the run, the step-0 checkpoint (or a resume's first restore)
    RUNNING = "running"  # chunks of steps, epoch scores, checkpoints
    RESTORING = "restoring"  # every student and the coordinator go back to a checkpoint
    ROLLING_BACK = "rolling_back"  # a failure stopped the chunk; the run's files go back to the latest checkpoint
    FINISHING = "finishing"  # every step is done; the run is being closed
    FAILED = "failed"  # the policy (or an error no policy answers) stopped the run
