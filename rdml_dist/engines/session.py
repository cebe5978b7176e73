"""Open a run for an engine: a fresh one in an empty run directory, or ``--resume`` of an earlier one.

Both paths end in the same :class:`RunSession`, which the engines hand to the one epoch loop;
a resumed run differs only in the checkpoint manifest it starts from.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rdml_dist.checkpoints import CHECKPOINTS, CheckpointStore
from rdml_dist.config import ExperimentConfig, check_resources, parse_config
from rdml_dist.errors import ConfigError
from rdml_dist.run_directory import CONFIG_FILE, RunDirectory
from rdml_dist.storage import Storage


@dataclass
class RunSession:
    """Everything an engine needs to train: the config, the run's files, its checkpoints and where to start."""

    config: ExperimentConfig
    storage: Storage
    run: RunDirectory
    checkpoints: CheckpointStore
    start: dict[str, Any] | None  # the manifest to continue from; None for a fresh run


def new_session(
    config: ExperimentConfig, run_dir: str | Path | None = None, overwrite: bool = False, engine: str | None = None
) -> RunSession:
    """A fresh run in ``run_dir`` (default: ``runtime.run_dir``), refusing to replace an earlier run unless told to.

    Nothing is written yet: the loop writes the run's files once the engine is up, so a cluster
    that cannot be reached leaves no run directory behind.
    """
    storage = Storage(str(run_dir) if run_dir is not None else config.resolved_run_dir(), field="runtime.run_dir")
    checkpoints = CheckpointStore(storage)
    if checkpoints.complete_steps():
        if not overwrite:
            raise ConfigError(
                "runtime.run_dir",
                f"{storage.describe()} already holds a run; continue it with `rdml-dist train --resume "
                f"{storage.describe()}`, choose another --run-dir, or pass --overwrite to replace it",
            )
        storage.delete(CHECKPOINTS)
    run = RunDirectory(storage, config, engine=engine or config.runtime.engine)
    return RunSession(config, storage, run, checkpoints, start=None)


def resume_session(location: str, address: str | None = None) -> RunSession:
    """Continue the run at ``location`` from its latest complete checkpoint, with the config it started with."""
    storage = Storage(location, field="--resume")
    if not storage.exists(CONFIG_FILE):
        raise ConfigError("--resume", f"{storage.describe()} holds no run ({CONFIG_FILE} is missing)")
    raw = yaml.safe_load(storage.read_bytes(CONFIG_FILE))
    raw["runtime"]["run_dir"] = location
    if address is not None:
        raw["runtime"]["ray"]["address"] = address
    config = parse_config(raw)
    check_resources(config)
    checkpoints = CheckpointStore(storage)
    start = checkpoints.latest()
    if start is None:
        raise ConfigError("--resume", f"{storage.describe()} has no complete checkpoint to continue from")
    run = RunDirectory(storage, config, engine=config.runtime.engine, resume_from=start)
    return RunSession(config, storage, run, checkpoints, start)
