"""One Tune trial: the base experiment at the trial's point of the space, trained by ``run_ray`` as ``rdml-dist train``
trains it, inside the trial's own placement group (bundle 0 is this function; the cohort's bundles follow).

The trial starts no placement group of its own (a group made inside a trial can hang the sweep,
ray-project/ray#47439): the cohort runs in the group Tune reserved through
:func:`trial_resources`, and Tune removes that group when the trial ends or is stopped.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdml_dist.config import ExperimentConfig
from rdml_dist.errors import ConfigError
from rdml_dist.tune.sweep import trial_experiment

if TYPE_CHECKING:
    from rdml_dist.run_records.storage import Storage

TRIAL_DRIVER_BUNDLE = 0
COHORT_FIRST_BUNDLE = 1


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares: the base experiment and where runs and monitoring files go."""

    base: dict[str, Any]
    runs: str  # {sweep dir}/runs: each trial's run directory is runs/<trial id>
    file_sd: str  # the Prometheus file_sd file listing every live trial (run label: the trial's id)
    driver_cpus: float


def trial_config(plan: TrialPlan, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The trial's experiment: the space's values on the base, its own run directory, and services on free ports
    so that trials sharing a node never collide; metrics carry the trial's id as their ``run``."""
    overrides = {
        **params,
        "name": trial_id,
        "runtime.run_dir": str(Path(plan.runs) / trial_id),
        "runtime.engine": "ray",
        "runtime.ray.address": None,
        "monitoring.port": 0,
        "monitoring.file_sd": plan.file_sd,
        "rpc.port": 0,
    }
    return trial_experiment(plan.base, overrides)


def trial_resources(plan: TrialPlan, params: dict[str, Any]) -> Any:
    """The trial's placement group: its driver, then the cohort's bundles in the order ``run_ray`` places them.

    A point of the space with an invalid value gets the driver's bundle only: the trial then fails
    on its config error without holding cohort resources.
    """
    from ray import tune

    from rdml_dist.engines.placement import cohort_bundles, student_resources

    driver = {"CPU": plan.driver_cpus}
    try:
        config = trial_config(plan, params, "resources")
    except ConfigError:
        return tune.PlacementGroupFactory([driver])
    return tune.PlacementGroupFactory([driver, *cohort_bundles(config, student_resources(config))],
                                      strategy=config.runtime.ray.placement_strategy)


def epoch_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One epoch's row of results.json as flat Tune metrics: ensemble, every student, α and λ."""
    metrics = {
        "epoch": entry["epoch"] + 1,
        "ensemble/val_accuracy": entry["ensemble_val_accuracy"],
        "alpha": entry["alpha"],
        "lambda": entry["mimicry_weight"],
        "epoch_seconds": entry["seconds"],
    }
    for name, values in entry["students"].items():
        for key in ("val_accuracy", "train_accuracy", "train_ce", "train_mimicry"):
            if key in values:
                metrics[f"student/{name}/{key}"] = values[key]
    return {key: (float(value) if value is not None else math.nan) for key, value in metrics.items()}


class TuneReporter:
    """A RunObserver that reports each epoch to Tune with the cohort checkpoint committed at its end.

    Tune copies the checkpoint into the trial's directory and keeps ``checkpoints_to_keep`` of
    them; a trial restarted by Tune continues from the run directory's latest checkpoint.
    """

    def __init__(self, run_location: str) -> None:
        self.run_location = run_location
        self.pending: dict[str, float] | None = None

    def on_epoch(self, entry: dict[str, Any]) -> None:
        self.pending = epoch_metrics(entry)

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        if self.pending is None:
            return
        from ray import tune

        from rdml_dist.run_records.checkpoints import checkpoint_directory

        metrics, self.pending = self.pending, None
        directory = Path(self.run_location) / checkpoint_directory(step)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)))


def rewind_to_tune_checkpoint(storage: "Storage", checkpoint: Any) -> None:
    """Make the checkpoint Tune holds the run's latest: a driver killed between a checkpoint and its report leaves
    the run ahead of Tune, and the trial must continue from what Tune recorded so every epoch is reported once.

    The run may have pruned that checkpoint meanwhile (``runtime.checkpoint.keep`` newer ones committed after the
    report), so Tune's copy is put back first, its manifest last, before the newer ones are dropped.
    """
    from rdml_dist.run_records.checkpoints import MANIFEST, CheckpointStore, checkpoint_directory

    with checkpoint.as_directory() as copy:
        manifest = Path(copy) / MANIFEST
        step = int(json.loads(manifest.read_text())["step"])
        target = checkpoint_directory(step)
        if not storage.exists(f"{target}/{MANIFEST}"):
            for file in sorted(Path(copy).iterdir()):
                if file.is_file() and file.name != MANIFEST:
                    storage.write_bytes(f"{target}/{file.name}", file.read_bytes())
            storage.write_bytes(f"{target}/{MANIFEST}", manifest.read_bytes())
    for newer in [complete for complete in CheckpointStore(storage).complete_steps() if complete > step]:
        storage.delete(checkpoint_directory(newer))


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The function every trial runs (in bundle 0 of its placement group)."""
    import ray
    from ray import tune

    from rdml_dist.engines.placement import GivenPlacement
    from rdml_dist.engines.observers import standard_observers
    from rdml_dist.engines.ray_engine import run_ray
    from rdml_dist.engines.session import new_session, resume_session, take_lease
    from rdml_dist.run_records.storage import Storage

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(plan, params, trial_id)
    location = config.resolved_run_dir()
    checkpoint = tune.get_checkpoint()
    storage = Storage(location, field="runtime.run_dir")
    # a retried trial may follow an attempt whose driver died on another node: wait for its lease to lapse
    lease = take_lease(storage, config, "runtime.run_dir", wait=True)
    try:
        if checkpoint is not None:
            storage.fence = lease.check
            rewind_to_tune_checkpoint(storage, checkpoint)
            session = resume_session(location, lease=lease)
        else:
            session = new_session(config, location, overwrite=True, engine="ray", lease=lease)
    except BaseException:
        lease.release()
        raise
    with session, standard_observers(session) as observers:  # the trial's own TensorBoard events and plots, as any run
        placement = GivenPlacement(ray.util.get_current_placement_group(), COHORT_FIRST_BUNDLE)
        run_ray(session, show_progress=False, observers=[*observers, TuneReporter(location)], placement=placement)
