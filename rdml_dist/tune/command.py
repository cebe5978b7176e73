"""``rdml-dist tune SWEEP.yaml [--resume]`` and ``rdml-dist validate SWEEP.yaml``: what the CLI prints and returns."""

import os
import sys

from rdml_dist.tune.sweep import load_sweep, trial_experiment, validate_sweep


def validate_command(path: str) -> int:
    """Every value the space can produce, checked against the base experiment: one line per problem, exit code 2."""
    sweep, base = load_sweep(path)
    problems = validate_sweep(sweep, base)
    for problem in problems:
        print(f"rdml-dist: invalid sweep value: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{path}: valid sweep {sweep.name!r} ({len(sweep.space)} searched fields: {', '.join(sweep.space)}; "
          f"metric {sweep.metric} ({sweep.mode}); search {sweep.search}; scheduler {sweep.scheduler.name})")
    return 0


def tune_command(path: str, resume: bool, address: str | None) -> int:
    """Run (or continue) the sweep, then write and print its results; exit code 1 when no trial succeeded.

    Values of the space that make an invalid experiment are only reported here: their trials
    fail with the config error while the others run.
    """
    sweep, base = load_sweep(path)
    trial_experiment(base, {})  # a broken base experiment fails every trial: stop before starting Ray
    for problem in validate_sweep(sweep, base):
        print(f"rdml-dist: warning: {problem} (that trial will fail)", file=sys.stderr)
    target = address or sweep.address or os.environ.get("RAY_ADDRESS")
    if target is None:
        from rdml_dist.engines.loopback import keep_local_ray_on_loopback

        keep_local_ray_on_loopback()
    import ray

    from rdml_dist.engines.ray_cluster import connect
    from rdml_dist.tune.runner import experiment_cpus, run_sweep, write_outputs

    connection = connect(target, experiment_cpus(sweep, base))
    print(f"rdml-dist: {connection.description}", flush=True)
    try:
        results = run_sweep(sweep, base, resume=resume)
        outputs = write_outputs(results, sweep, base)
    finally:
        if connection.started:
            ray.shutdown()
    table = sweep.directory() / "sweep_results.md"
    print(table.read_text())
    print("\n".join(f"rdml-dist: wrote {file}" for file in outputs["files"]))
    if outputs["best"] is None:
        print(f"rdml-dist: no trial reported {sweep.metric}: every trial failed (see {table})", file=sys.stderr)
        return 1
    return 0
