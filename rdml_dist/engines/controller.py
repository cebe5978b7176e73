"""The driver's state machine: starting, running, restoring, rolling back, finishing, failed.

The epoch loop moves between these states; each move is logged and published (the Ray engine
hands it to the coordinator, so ``rdml-dist status`` and the ``rdml_driver_state`` metric show
the same state as the logs).
"""

import logging
from collections.abc import Callable

from rdml_dist.messages import DriverState

logger = logging.getLogger("rdml-dist")


class DriverStates:
    """The current state, with every change logged and handed to ``publish``."""

    def __init__(self, publish: Callable[[DriverState], None] | None = None) -> None:
        self.publish = publish
        self.state: DriverState | None = None

    def enter(self, state: DriverState, why: str = "") -> None:
        if state is self.state:
            return
        self.state = state
        logger.log(logging.WARNING if state in (DriverState.ROLLING_BACK, DriverState.FAILED) else logging.INFO,
                   "driver state: %s%s", state.value, f" ({why})" if why else "")
        if self.publish is not None:
            try:
                self.publish(state)
            except Exception as error:  # noqa: BLE001 - a display must not change what the driver does
                logger.warning("driver state %s not published: %s", state.value, error)
