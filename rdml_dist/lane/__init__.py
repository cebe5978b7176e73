"""The frame lane: a direct TCP connection from each Ray student to the coordinator for the per-step exchange.

An actor call costs a few milliseconds of Ray's own machinery per student and step; the lane
carries the same frames and replies over one persistent socket per student, into the same
:class:`~rdml_dist.coordinator_core.barrier.CohortBarrier`, and raises the same errors, so the runtime's failure
handling does not depend on which transport a step used (``runtime.exchange.transport``).
"""
