"""A coordinator step's computation held open until the test releases it: what runs beside a computation.

Used by the barrier's unit tests and by the gRPC service's test; the computation itself is the real one.
"""

import asyncio
import threading

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.coordinator_core.coordinator import PendingStep
from rdml_dist.divergence import MimicryResult


class HeldComputation:
    """The barrier's first computation waits until :meth:`release` (at most ``hold_s``); it raises ``error`` if one is given."""

    def __init__(self, barrier: CohortBarrier, error: Exception | None = None, hold_s: float = 10.0) -> None:
        self.started, self.released = threading.Event(), threading.Event()
        self.error, self.hold_s = error, hold_s
        # held on the event loop, it would hold the loop too: every computation goes to the worker thread
        barrier.inline_below_elements = 0
        self._mimicry = barrier.core.mimicry
        barrier.core.mimicry = self._held  # type: ignore[method-assign]

    def _held(self, pending: PendingStep) -> MimicryResult | None:
        first = not self.started.is_set()
        self.started.set()
        if first:
            assert self.released.wait(self.hold_s), "the test never released the computation"
            if self.error is not None:
                raise self.error
        return self._mimicry(pending)

    async def running(self) -> None:
        """Return once the computation has started, without blocking the event loop that awaits it."""
        assert await asyncio.get_running_loop().run_in_executor(None, self.started.wait, self.hold_s), "nothing was computed"

    def release(self) -> None:
        self.released.set()
