"""Engines run a validated experiment and fill a run directory: ``local`` (one process) and ``ray``."""

from pathlib import Path

from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.loopback import keep_local_ray_on_loopback
from rdml_dist.run_directory import RunDirectory


def train_cohort(config: ExperimentConfig, run_dir: str | Path | None = None, show_progress: bool = True) -> RunDirectory:
    """Train ``config``'s cohort with its ``runtime.engine``; returns the run directory (call ``finish()``).

    ``run_dir`` defaults to ``runtime.run_dir``. The Ray engine joins ``runtime.ray.address``
    or starts a local Ray on loopback (Ray is imported only when this engine is used).
    """
    target = Path(run_dir) if run_dir is not None else config.resolved_run_dir()
    if config.runtime.engine == "local":
        from rdml_dist.engines.local import train_local

        return train_local(config, target, show_progress)
    if config.runtime.ray.address is None:
        keep_local_ray_on_loopback()
    from rdml_dist.engines.ray_engine import train_ray

    return train_ray(config, target, show_progress)
