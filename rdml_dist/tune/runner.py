"""Run a sweep on Ray Tune (needs the ``tune`` extra), or continue one whose driver died."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdml_dist.errors import ConfigError
from rdml_dist.tune.space import check_domain, tune_domain
from rdml_dist.tune.sweep import SweepConfig, trial_experiment
from rdml_dist.tune.trainable import TrialPlan, run_trial, trial_resources

RUNS = "runs"
FILE_SD = "file_sd.json"


def trial_directory_name(trial: Any) -> str:
    """Trial directories are named by the trial's id (the parameters are in its params.json)."""
    return trial.trial_id


def plan_of(sweep: SweepConfig, base: dict[str, Any]) -> TrialPlan:
    """Runs under the sweep's directory; trials listed in the base's ``monitoring.file_sd``, else the sweep's own."""
    directory = sweep.directory()
    file_sd = (base.get("monitoring") or {}).get("file_sd") or str(directory / FILE_SD)
    return TrialPlan(base=base, runs=str(directory / RUNS), file_sd=file_sd, driver_cpus=sweep.driver_cpus)


def monitoring_release(plan: TrialPlan) -> Any:
    """A Tune callback that drops an ended trial's file_sd entry: a trial stopped by ASHA is killed with its actors
    before its cohort can drop the entry itself."""
    from ray import tune

    from rdml_dist.metrics import FileSdEntry

    class ReleaseMonitoring(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._release(trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._release(trial.trial_id)

        def _release(self, trial_id: str) -> None:
            placements = Path(plan.runs) / trial_id / "placements.json"
            if not placements.exists():
                return
            entry = FileSdEntry(plan.file_sd, trial_id)
            entry.address = json.loads(placements.read_text())["coordinator"].get("metrics")
            entry.remove()

    return ReleaseMonitoring()


def trainable(plan: TrialPlan) -> Any:
    """``run_trial`` bound to the sweep's plan, each trial in a placement group sized for its own cohort."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), lambda params: trial_resources(plan, params))


def _scheduler(sweep: SweepConfig, base: dict[str, Any]) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    if sweep.scheduler.name == "none":
        return None
    settings = sweep.scheduler
    max_t = settings.max_t or trial_experiment(base, {}).training.epochs
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


def _search_algorithm(sweep: SweepConfig) -> Any:
    if sweep.search != "optuna":
        return None  # Tune's BasicVariantGenerator: grids crossed, the other parameters sampled
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search", 'optuna is not installed: pip install "rdml-dist[tune]" optuna, or use search: random') from None
    return OptunaSearch()


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    return {path: tune_domain(*check_domain(path, spec)) for path, spec in sweep.space.items()}


def experiment_cpus(sweep: SweepConfig, base: dict[str, Any]) -> float:
    """CPUs a local Ray needs to run ``max_concurrent_trials`` trials of the base experiment side by side."""
    from rdml_dist.engines.placement import student_cpus

    config = trial_experiment(base, {})
    per_trial = sweep.driver_cpus + config.runtime.coordinator.cpus * config.runtime.coordinator.shards + sum(
        student_cpus(config, student) for student in config.students if not student.external
    )
    return per_trial * (sweep.max_concurrent_trials or 1)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], resume: bool = False, callbacks: Sequence[Any] = ()) -> Any:
    """Fit the sweep (or restore it with ``resume``) and return Tune's ResultGrid.

    Finished trials of a restored sweep are kept as they are; trials that were running continue
    from their latest checkpoint.
    """
    from ray import tune

    directory = sweep.directory()
    plan = plan_of(sweep, base)
    wrapped = trainable(plan)
    if resume:
        if not tune.Tuner.can_restore(str(directory)):
            raise ConfigError("--resume", f"{directory} holds no sweep to continue (start it without --resume)")
        tuner = tune.Tuner.restore(str(directory), trainable=wrapped, resume_unfinished=True, resume_errored=False)
    else:
        if tune.Tuner.can_restore(str(directory)):
            raise ConfigError("name", f"{directory} already holds sweep {sweep.name!r}; continue it with --resume, "
                                      "or choose another name or storage")
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials, scheduler=_scheduler(sweep, base),
                search_alg=_search_algorithm(sweep), reuse_actors=False, trial_dirname_creator=trial_directory_name,
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=str(directory.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.checkpoints_to_keep),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[monitoring_release(plan), *callbacks], verbose=1,
            ),
        )
    return tuner.fit()


def write_outputs(results: Any, sweep: SweepConfig, base: dict[str, Any]) -> dict[str, Any]:
    """The table, best.yaml and the plots in the sweep's directory; returns the outcomes and the files written."""
    from rdml_dist.tune.plots import plot_learning_curves, plot_parameters
    from rdml_dist.tune.results import outcomes, write_best, write_table

    directory = sweep.directory()
    rows = outcomes(results, sweep, base)
    files = [*write_table(rows, sweep, directory)]
    best = write_best(rows, sweep, base, directory)
    if best is not None:
        files.append(best)
    files.extend(plot_parameters(rows, sweep, directory))
    files.append(plot_learning_curves(rows, sweep, directory))
    return {"rows": rows, "files": files, "best": best}
