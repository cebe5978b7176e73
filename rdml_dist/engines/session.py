"""Open a run for an engine: a fresh one in an empty run directory, or ``--resume`` of an earlier one.

Both paths end in the same :class:`RunSession`, which the engines hand to the one epoch loop;
a resumed run differs only in the checkpoint manifest it starts from. :func:`open_run` is what
``rdml-dist train CONFIG`` does, so that a retried job (KubeRay's ``backoffLimit``, a resubmitted
entrypoint) continues its run instead of failing or starting over.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rdml_dist.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig, check_resources, parse_config
from rdml_dist.errors import ConfigError
from rdml_dist.run_directory import CONFIG_FILE, RESULTS_JSON, RunDirectory
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

    Nothing is written or deleted yet: the loop starts the run's files once the cohort is up
    (:meth:`RunDirectory.write_config`), so a cluster that cannot be reached leaves the directory,
    and a run that ``overwrite`` would replace, as they were.
    """
    storage = Storage(str(run_dir) if run_dir is not None else config.resolved_run_dir(), field="runtime.run_dir")
    checkpoints = CheckpointStore(storage)
    if checkpoints.complete_steps() and not overwrite:
        raise ConfigError(
            "runtime.run_dir",
            f"{storage.describe()} already holds a run; continue it with `rdml-dist train --resume "
            f"{storage.describe()}`, choose another --run-dir, or pass --overwrite to replace it",
        )
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


# Where and how to reach the cluster, not what is trained: a retried job may differ in these.
RUNTIME_ADDRESS_FIELDS = ("runtime.ray.address", "runtime.run_dir", "runtime.storage")
MAX_NUMBERED_RUNS = 1000


@dataclass
class RunPlan:
    """Where ``rdml-dist train CONFIG`` trains, whether it continues the run there, and the line that says so."""

    location: str
    resume: bool
    says: str


def plan_run(config: ExperimentConfig, overwrite: bool = False) -> RunPlan:
    """Where ``rdml-dist train CONFIG`` trains: its ``runtime.run_dir``, continued if it holds this config's unfinished run.

    - empty (or a run that never completed its first checkpoint): a new run there;
    - an unfinished run whose saved config equals ``config`` (runtime addresses aside): it is resumed;
    - an unfinished run of another config: refused, naming the fields that differ;
    - a finished run: never overwritten (unless ``overwrite``); the run goes to the first numbered
      sibling (``digits-renyi-2``, ``-3``, ...) that is free or holds this config's unfinished run.
    """
    location = config.resolved_run_dir()
    if overwrite:
        replacing = f"a new run at {Storage(location).describe()} (replacing any run there once the cohort is up)"
        return RunPlan(location, resume=False, says=replacing)
    for number in range(1, MAX_NUMBERED_RUNS + 1):
        candidate = location if number == 1 else f"{location.rstrip('/')}-{number}"
        storage = Storage(candidate, field="runtime.run_dir")
        saved = _saved_config(storage)
        manifest = None if saved is None else CheckpointStore(storage).latest()
        if saved is not None and _finished(storage, saved, manifest):
            continue
        if manifest is None:  # nothing here, or a run that never completed its first checkpoint
            finished = "" if number == 1 else f" (the run at {location}{'' if number == 2 else f' to -{number - 1}'} finished)"
            return RunPlan(candidate, resume=False, says=f"a new run at {storage.describe()}{finished}")
        differences = config_differences(saved, config)
        if differences:
            raise ConfigError(
                "runtime.run_dir",
                f"{storage.describe()} holds an unfinished run of another config ({', '.join(differences)} differ); "
                f"continue it with `rdml-dist train --resume {storage.describe()}`, choose another --run-dir, "
                "or pass --overwrite to replace it",
            )
        return RunPlan(candidate, resume=True, says=(
            f"resuming the unfinished run at {storage.describe()} from its checkpoint at step {manifest['step']} "
            f"({manifest['epochs_done']} of {config.training.epochs} epochs done; its saved config is this one)"))
    raise ConfigError("runtime.run_dir", f"{location} and {MAX_NUMBERED_RUNS - 1} numbered siblings all hold finished runs")


def config_differences(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """Dotted names of the fields in which a saved config (as read from ``config.yaml``) and ``config`` differ."""
    try:
        saved = parse_config(saved).model_dump(mode="json")  # fields added since it was saved take their defaults
    except ConfigError as error:
        return [field for field, _ in error.problems]
    before, now = _flatten(saved), _flatten(config.model_dump(mode="json"))
    return sorted(
        name for name in before.keys() | now.keys()
        if before.get(name, "(absent)") != now.get(name, "(absent)")
        and not any(name == ignored or name.startswith(f"{ignored}.") for ignored in RUNTIME_ADDRESS_FIELDS)
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        items: Any = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _saved_config(storage: Storage) -> dict[str, Any] | None:
    return yaml.safe_load(storage.read_bytes(CONFIG_FILE)) if storage.exists(CONFIG_FILE) else None


def _finished(storage: Storage, saved: dict[str, Any], manifest: dict[str, Any] | None) -> bool:
    """Whether the run trained all its epochs (its last checkpoint, or results whose checkpoints were removed)."""
    epochs = saved["training"]["epochs"]
    if manifest is not None:
        return manifest["epochs_done"] >= epochs
    return storage.exists(RESULTS_JSON) and len(json.loads(storage.read_bytes(RESULTS_JSON))["epochs"]) >= epochs
