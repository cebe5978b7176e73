"""Open a run for an engine: a fresh one in an empty run directory, or ``--resume`` of an earlier one.

Both paths end in the same :class:`RunSession`, which the engines hand to the one epoch loop;
a resumed run differs only in the checkpoint manifest it starts from. :func:`plan_run` is what
``rdml-dist train CONFIG`` does, so that a retried job (KubeRay's ``backoffLimit``, a resubmitted
entrypoint) continues its run instead of failing or starting over.

Every session holds the run's lease (:mod:`rdml_dist.run_records.run_lease`) from the moment it is opened
until it is closed, and its storage checks the lease before every write: a run has one writer.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import ExperimentConfig, check_resources, parse_config
from rdml_dist.errors import ConfigError
from rdml_dist.logs import logger
from rdml_dist.run_records.run_directory import CONFIG_FILE, RESULTS_JSON, RunDirectory
from rdml_dist.run_records.run_lease import LeaseHeld, LeaseLost, LeaseRecord, RunLease, newest_lease
from rdml_dist.run_records.storage import Storage


@dataclass
class RunSession:
    """Everything an engine needs to train: the config, the run's files, its checkpoints and where to start."""

    config: ExperimentConfig
    storage: Storage
    run: RunDirectory
    checkpoints: CheckpointStore
    start: dict[str, Any] | None  # the manifest to continue from; None for a fresh run
    lease: RunLease  # held until close(); the storage checks it before every write

    def close(self) -> None:
        """Release the run's lease; nothing is written through this session after it (a finished run's table is
        written before: :meth:`RunDirectory.finish`). A run that never began its files (its cluster could not be
        reached, say) leaves no lease behind either."""
        try:
            began = self.storage.exists(CONFIG_FILE)
        except Exception:  # noqa: BLE001 - the lease is released whatever happened to the run's files
            began = True
        finally:
            self.storage.fence = _closed
        self.lease.release(forget=not began)

    def __enter__(self) -> "RunSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _closed() -> None:
    raise LeaseLost("this run's session is closed: it writes nothing more")


def take_lease(storage: Storage, config: ExperimentConfig, field: str, wait: bool = False) -> RunLease:
    """The run's lease, waiting (when ``wait``) up to ``runtime.lease.wait_s`` for a live holder; a clear error if held."""
    settings = config.runtime.lease

    def say_waiting(holder: LeaseRecord) -> None:
        logger.info(f"{storage.describe()} is being written by another driver ({holder.describe()}); "
                    f"waiting up to {settings.wait_s:.0f} s for it to finish or its lease to lapse")

    try:
        return RunLease.acquire(storage, settings.ttl_s, settings.wait_s if wait else 0.0, on_wait=say_waiting)
    except LeaseHeld as held:
        waited = f" after waiting {settings.wait_s:.0f} s" if wait else ""
        raise ConfigError(field, f"{held}{waited}; it is left untouched") from None


def _open(config: ExperimentConfig, storage: Storage, lease: RunLease, engine: str,
          start: dict[str, Any] | None) -> RunSession:
    storage.fence = lease.check
    run = RunDirectory(storage, config, engine=engine, resume_from=start)
    return RunSession(config, storage, run, CheckpointStore(storage), start, lease)


def new_session(
    config: ExperimentConfig, run_dir: str | Path | None = None, overwrite: bool = False, engine: str | None = None,
    lease: RunLease | None = None,
) -> RunSession:
    """A fresh run in ``run_dir`` (default: ``runtime.run_dir``), refusing to replace an earlier run unless told to.

    The session takes the run's lease (or adopts ``lease``, taken by :func:`plan_run`); a run
    another live driver writes is refused, ``overwrite`` or not. Nothing is written or deleted
    yet: the loop starts the run's files once the cohort is up (:meth:`RunDirectory.write_config`),
    so a cluster that cannot be reached leaves the directory, and a run that ``overwrite`` would
    replace, as they were.
    """
    storage = Storage(str(run_dir) if run_dir is not None else config.resolved_run_dir(), field="runtime.run_dir")
    lease = lease or take_lease(storage, config, "runtime.run_dir")
    if CheckpointStore(storage).complete_steps() and not overwrite:
        lease.release()
        raise ConfigError(
            "runtime.run_dir",
            f"{storage.describe()} already holds a run; continue it with `rdml-dist train --resume "
            f"{storage.describe()}`, choose another --run-dir, or pass --overwrite to replace it",
        )
    return _open(config, storage, lease, engine or config.runtime.engine, start=None)


def resume_session(location: str, address: str | None = None, lease: RunLease | None = None) -> RunSession:
    """Continue the run at ``location`` from its latest complete checkpoint, with the config it started with.

    A live driver of that run is waited for (``runtime.lease.wait_s`` of its saved config) unless
    ``lease`` was already taken by :func:`plan_run`.
    """
    storage = Storage(location, field="--resume")
    if lease is None:
        lease = take_lease(storage, _saved_run_config(storage, location, address), "--resume", wait=True)
    try:
        config = _saved_run_config(storage, location, address)  # read again under the lease: the last driver's word
        check_resources(config)
        start = CheckpointStore(storage).latest()
        if start is None:
            raise ConfigError("--resume", f"{storage.describe()} has no complete checkpoint to continue from")
        return _open(config, storage, lease, config.runtime.engine, start)
    except BaseException:
        lease.release()
        raise


def _saved_run_config(storage: Storage, location: str, address: str | None) -> ExperimentConfig:
    """The config a run was started with, at ``location`` and (when given) on another cluster."""
    raw = _saved_config(storage)
    if raw is None:
        raise ConfigError("--resume", f"{storage.describe()} holds no run ({CONFIG_FILE} is missing)")
    raw["runtime"]["run_dir"] = location
    if address is not None:
        raw["runtime"]["ray"]["address"] = address
    return parse_config(raw)


# Where and how to reach the cluster, not what is trained: a retried job may differ in these.
RUNTIME_ADDRESS_FIELDS = ("runtime.ray.address", "runtime.run_dir", "runtime.storage", "runtime.lease",
                          "rpc.token")  # never saved: a resume takes it from the config or the environment again
MAX_NUMBERED_RUNS = 1000


@dataclass
class RunPlan:
    """Where ``rdml-dist train CONFIG`` trains, whether it continues the run there, the line that says so, and its lease."""

    location: str
    resume: bool
    says: str
    lease: RunLease


def plan_run(config: ExperimentConfig, overwrite: bool = False, wait: bool = False) -> RunPlan:
    """Where ``rdml-dist train CONFIG`` trains: its ``runtime.run_dir``, continued if it holds this config's unfinished run.

    - empty (or a run that never completed its first checkpoint): a new run there;
    - an unfinished run whose saved config equals ``config`` (runtime addresses aside): it is resumed;
    - an unfinished run of another config: refused, naming the fields that differ;
    - a finished run: never overwritten (unless ``overwrite``); the run goes to the first numbered
      sibling (``digits-renyi-2``, ``-3``, ...) that is free or holds this config's unfinished run;
    - a run another live driver writes (its lease): a plain train goes on to the next sibling and
      says why; with ``wait`` (a retried job) it waits for that driver's lease, then decides again.

    The returned plan holds the chosen directory's lease, so no other driver can take it between
    this decision and the training.
    """
    location = config.resolved_run_dir()
    if overwrite:
        storage = Storage(location, field="runtime.run_dir")
        replacing = f"a new run at {storage.describe()} (replacing any run there once the cohort is up)"
        return RunPlan(location, resume=False, says=replacing, lease=take_lease(storage, config, "runtime.run_dir"))
    busy: list[str] = []
    for number in range(1, MAX_NUMBERED_RUNS + 1):
        candidate = location if number == 1 else f"{location.rstrip('/')}-{number}"
        storage = Storage(candidate, field="runtime.run_dir")
        holder = newest_lease(storage)
        if _finished_run(storage) and (holder is None or not holder.live()):
            continue
        if wait:
            lease = take_lease(storage, config, "runtime.run_dir", wait=True)
        else:
            try:
                lease = RunLease.acquire(storage, config.runtime.lease.ttl_s)
            except LeaseHeld as held:  # another live driver writes it: a plain train goes on to the next sibling
                busy.append(str(held))
                continue
        try:
            plan = _plan_under_lease(config, candidate, storage, lease, number, location, busy)
        except BaseException:
            lease.release(forget=not storage.exists(CONFIG_FILE))
            raise
        if plan is not None:
            return plan
        lease.release()
    raise ConfigError("runtime.run_dir", f"{location} and {MAX_NUMBERED_RUNS - 1} numbered siblings all hold finished "
                                         "or running runs")


def _plan_under_lease(config: ExperimentConfig, candidate: str, storage: Storage, lease: RunLease, number: int, location: str,
                      busy: list[str]) -> RunPlan | None:
    """What to do with a directory whose lease this driver holds: None when its run has finished."""
    saved = _saved_config(storage)
    manifest = None if saved is None else CheckpointStore(storage).latest()
    if saved is not None and _finished(storage, saved, manifest):
        return None
    if manifest is None:  # nothing here, or a run that never completed its first checkpoint
        why = "; ".join(busy) if busy else (
            "" if number == 1 else f"the run at {location}{'' if number == 2 else f' to -{number - 1}'} finished")
        return RunPlan(candidate, resume=False, says=f"a new run at {storage.describe()}{f' ({why})' if why else ''}",
                       lease=lease)
    differences = config_differences(saved, config)
    if differences:
        raise ConfigError(
            "runtime.run_dir",
            f"{storage.describe()} holds an unfinished run of another config ({', '.join(differences)} differ); "
            f"continue it with `rdml-dist train --resume {storage.describe()}`, choose another --run-dir, "
            "or pass --overwrite to replace it",
        )
    return RunPlan(candidate, resume=True, lease=lease, says=(
        f"resuming the unfinished run at {storage.describe()} from its checkpoint at step {manifest['step']} "
        f"({manifest['epochs_done']} of {config.training.epochs} epochs done; its saved config is this one)"))


def _finished_run(storage: Storage) -> bool:
    saved = _saved_config(storage)
    return saved is not None and _finished(storage, saved, CheckpointStore(storage).latest())


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
