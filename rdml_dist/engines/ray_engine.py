"""The Ray engine: connect to a cluster, reserve the cohort's placement group, run the epoch loop on a Ray cohort.

The parts live beside it: :mod:`~rdml_dist.engines.placement` sizes and reserves the group,
:mod:`~rdml_dist.engines.ray_cohort` runs the actors and carries out the failure policy,
:mod:`~rdml_dist.engines.failures` classifies errors, :mod:`~rdml_dist.engines.loop` is the
driver's state machine.
"""

from collections.abc import Sequence
from pathlib import Path

import ray

from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.loop import RunObserver, train_loop
from rdml_dist.engines.placement import (
    CohortDoesNotFit, GivenPlacement, cohort_bundles, reserve_cohort, student_cpus, student_resources,
)
from rdml_dist.engines.ray_cluster import connect
from rdml_dist.engines.ray_cohort import RayCohort
from rdml_dist.engines.session import RunSession, new_session
from rdml_dist.logs import logger
from rdml_dist.rpc.auth import check_bind, resolve_token
from rdml_dist.run_records.run_directory import RunDirectory

# The placement names stay importable from here (Ray Tune trials use them).
__all__ = ["CohortDoesNotFit", "GivenPlacement", "RayCohort", "cohort_bundles", "run_ray", "student_resources", "train_ray"]


def run_ray(
    session: RunSession,
    show_progress: bool = True,
    observers: Sequence[RunObserver] = (),
    placement: GivenPlacement | None = None,
) -> RunDirectory:
    """Train an opened run as Ray actors on the requested cluster (or a private local Ray).

    By default the cohort reserves its own placement group; a Ray Tune trial passes the trial's
    group (``placement``) instead, since a group reserved inside a trial can hang the sweep.
    """
    config = session.config
    token = resolve_token(config.rpc)
    if config.rpc.enabled:
        check_bind(config.rpc, token)
    cpus_needed = config.runtime.coordinator.cpus * config.runtime.coordinator.shards + sum(
        student_cpus(config, student) for student in config.students if not student.external
    )
    connection = connect(config.runtime.ray.address, cpus_needed)
    logger.info(connection.description)
    try:
        bundles = student_resources(config)
        owned = placement is None
        given = GivenPlacement(reserve_cohort(config, bundles), 0) if placement is None else placement
        cohort = RayCohort(config, given, bundles, session.storage, session.run.write_placements, token, owns_group=owned)
        if cohort.rpc_address:
            logger.info(f"cohort service (gRPC) at {cohort.rpc_address}")
        if cohort.metrics_address:
            logger.info(f"metrics at http://{cohort.metrics_address}/metrics")
        try:
            return train_loop(config, cohort, session.run, session.checkpoints, session.start, show_progress, observers,
                              publish_state=cohort.publish_state)
        finally:
            cohort.shutdown()
    finally:
        if connection.started:
            ray.shutdown()


def train_ray(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True) -> RunDirectory:
    """Train ``config``'s cohort as Ray actors, whatever its ``runtime.engine`` says."""
    with new_session(config, run_dir, engine="ray") as session:
        run = run_ray(session, show_progress)
        run.finish()  # the readable table, written while the lease is held
        return run
