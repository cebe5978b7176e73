"""Engines run a validated experiment and fill a run directory: ``local`` (one process) and ``ray``."""

from collections.abc import Sequence
from pathlib import Path

from rdml_dist.config import ExperimentConfig
from rdml_dist.errors import ConfigError
from rdml_dist.engines.loop import RunObserver
from rdml_dist.engines.loopback import keep_local_ray_on_loopback
from rdml_dist.engines.session import RunSession, new_session, resume_session
from rdml_dist.run_records.run_directory import RunDirectory
from rdml_dist.run_records.run_lease import RunLease


def train_cohort(
    config: ExperimentConfig, run_dir: str | Path | None = None, show_progress: bool = True, overwrite: bool = False,
    lease: RunLease | None = None,
) -> RunDirectory:
    """Train ``config``'s cohort with its ``runtime.engine``; returns the run directory (``finish()`` gives its table).

    ``run_dir`` (a path or URI) defaults to ``runtime.run_dir``. The Ray engine joins
    ``runtime.ray.address`` or starts a local Ray on loopback (Ray is imported only when this engine is used).
    """
    return _observed(new_session(config, run_dir, overwrite, lease=lease), show_progress)


def resume_cohort(
    location: str, address: str | None = None, show_progress: bool = True, lease: RunLease | None = None
) -> RunDirectory:
    """Continue a stopped, crashed or killed run from its latest complete cohort checkpoint (waiting for a live driver of it)."""
    return _observed(resume_session(location, address, lease), show_progress)


def _observed(session: RunSession, show_progress: bool) -> RunDirectory:
    """Run ``session`` with its TensorBoard events and final plots (imported here: the writer is not light)."""
    from rdml_dist.engines.observers import standard_observers

    with session, standard_observers(session) as observers:
        run = run_session(session, show_progress, observers)
        run.finish()  # the readable table, written while the lease is held
        return run


def run_session(session: RunSession, show_progress: bool = True, observers: Sequence[RunObserver] = ()) -> RunDirectory:
    """Hand an opened run to its engine; ``observers`` follow its epochs and checkpoints."""
    if session.config.runtime.engine == "local":
        external = [index for index, student in enumerate(session.config.students) if student.external]
        if external:
            raise ConfigError(f"students.{external[0]}.external",
                              "external students join a Ray-engine cohort over gRPC; use runtime.engine: ray")
        from rdml_dist.engines.local import run_local

        return run_local(session, show_progress, observers)
    if session.config.runtime.ray.address is None:
        keep_local_ray_on_loopback()
    from rdml_dist.engines.ray_engine import run_ray

    return run_ray(session, show_progress, observers)
