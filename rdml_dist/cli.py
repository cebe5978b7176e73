"""``rdml-dist``: validate a config, train a cohort, run an external student, show a running cohort, or plot a run.

Each command imports what it needs when it runs: ``rdml-dist status`` never loads torch's model and
data code, and ``--help`` loads nothing beyond this module.
"""

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from rdml_dist.errors import ClusterError, ConfigError
from rdml_dist.logs import configure_logging
from rdml_dist.user_modules import make_user_modules_importable

if TYPE_CHECKING:
    from rdml_dist.run_records.run_directory import RunDirectory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdml-dist", description="Rényi divergence deep mutual learning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a cohort (no CONFIG: the embedded digits default)")
    validate = commands.add_parser("validate", help="check a config without running anything")
    for command in (train, validate):
        command.add_argument("config", nargs="?", help="experiment YAML file")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
            help="override a config field, e.g. --set mimicry.alpha=0.5 (repeatable)",
        )
    train.add_argument("--engine", choices=["local", "ray"], help="override runtime.engine")
    train.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: start a local one)")
    train.add_argument("--run-dir", help="override runtime.run_dir (a path or a URI such as s3://bucket/runs/x)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped, crashed or killed run from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in the run directory (without it an unfinished run of this config is "
                            "continued, and a finished one is kept: this run goes to a numbered sibling)")
    train.add_argument("--if-running", choices=["new", "wait"],
                       help="when another live driver writes this config's run: `new` trains a numbered sibling "
                            "(the default), `wait` waits up to runtime.lease.wait_s for it, then continues the run "
                            "(the default inside a Ray job, whose retry must continue its run)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    student = commands.add_parser("student", help="run one external student (students[].external) outside Ray, over gRPC")
    student.add_argument("config", help="the cohort's experiment YAML file")
    student.add_argument("--name", required=True, help="the student's name in the config")
    student.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a config field (must agree with the cohort's)")
    status = commands.add_parser("status", help="show a running cohort (members, step, losses, samples/s)")
    status.add_argument("--watch", action="store_true", help="keep following the cohort until it ends (Ctrl-C stops)")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between updates with --watch (default 2)")
    report = commands.add_parser("report", help="draw the PNG plots of a run (accuracy, losses, time per step)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (a path or a URI)")
    report.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")
    tune = commands.add_parser("tune", help="a Ray Tune sweep, each trial one whole cohort (needs rdml-dist[tune])")
    tune.add_argument("config", metavar="SWEEP", help="sweep YAML file (base experiment, search space, metric, scheduler)")
    tune.add_argument("--resume", action="store_true", help="continue the sweep after its driver died (finished trials stay)")
    tune.add_argument("--address", help="Ray cluster to join (default: the sweep's address, else start a local one)")
    for command in (student, status):
        command.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the cohort service's address")
        command.add_argument("--token", help="the cohort's bearer token (default: the RDML_RPC_TOKEN variable)")
        command.add_argument("--ca-file", help="CA certificate of a coordinator serving TLS")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    make_user_modules_importable(getattr(args, "config", None))
    command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return command(args)
    except ClusterError as error:
        print(f"rdml-dist: {error}", file=sys.stderr)
        return 1


def _config_problems(error: ConfigError, what: str = "invalid config") -> int:
    """One line per problem, every problem at once; exit code 2."""
    for field, problem in error.problems:
        print(f"rdml-dist: {what}: {field}: {problem}", file=sys.stderr)
    return 2


def _validate(args: argparse.Namespace) -> int:
    from rdml_dist.config import load_config
    from rdml_dist.tune.sweep import is_sweep_file

    try:
        if args.config and not args.overrides and is_sweep_file(args.config):
            from rdml_dist.tune.command import validate_command

            return validate_command(args.config)
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        return _config_problems(error)
    source = args.config or "the embedded default"
    print(f"{source}: valid ({len(config.students)} students: {', '.join(config.student_names())}; "
          f"{config.mimicry.divergence}, alpha={config.mimicry.alpha}; engine {config.runtime.engine})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from rdml_dist.engines.failure_policy import RunFailed

    try:
        return _resume(args) if args.resume else _train_new(args)
    except RunFailed as error:
        print(f"rdml-dist: {error}", file=sys.stderr)
        return 1


def _train_new(args: argparse.Namespace) -> int:
    from rdml_dist.config import load_config
    from rdml_dist.engines import resume_cohort, train_cohort
    from rdml_dist.engines.session import plan_run

    try:
        config = load_config(args.config, _engine_overrides(args))
        plan = plan_run(config, overwrite=args.overwrite, wait=_waits_for_a_live_run(args))  # a retried job continues its run
        print(f"rdml-dist: {plan.says}", flush=True)
        show_progress = not args.no_progress
        run = (resume_cohort(plan.location, config.runtime.ray.address, show_progress, lease=plan.lease) if plan.resume
               else train_cohort(config, plan.location, show_progress, overwrite=args.overwrite, lease=plan.lease))
    except ConfigError as error:
        return _config_problems(error)
    return _report(run)


def _waits_for_a_live_run(args: argparse.Namespace) -> bool:
    """``--if-running``; unset, a driver started as a Ray job waits (its retry must continue the run, not fork it)."""
    from rdml_dist.config.schema import RAY_JOB_ENVIRONMENT

    return args.if_running == "wait" if args.if_running else bool(os.environ.get(RAY_JOB_ENVIRONMENT))


def _engine_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"runtime.engine={args.engine}")
    if args.address:
        overrides.append(f"runtime.ray.address={args.address}")
    if args.run_dir:
        overrides.append(f"runtime.run_dir={args.run_dir}")
    return overrides


def _resume(args: argparse.Namespace) -> int:
    from rdml_dist.engines import resume_cohort

    if args.config or args.overrides or args.engine or args.run_dir or args.overwrite or args.if_running:
        print("rdml-dist: --resume continues a run with the config it started with (waiting for a live driver of it); "
              "drop CONFIG, --set, --engine, --run-dir, --overwrite and --if-running", file=sys.stderr)
        return 2
    try:
        return _report(resume_cohort(args.resume, args.address, show_progress=not args.no_progress))
    except ConfigError as error:
        return _config_problems(error, "cannot resume")


def _report(run: "RunDirectory") -> int:
    print(run.finish())
    where = run.storage.describe
    print(f"\nresults: {where('results.json')}  table: {where('results.txt')}  checkpoints: {where('checkpoints')}")
    print(f"tensorboard: {where('tensorboard')}  plots: {where('plots')}")
    return 0


def _plots(args: argparse.Namespace) -> int:
    from rdml_dist.run_records.plots import PLOTS_DIR, read_results, write_plots
    from rdml_dist.run_records.storage import Storage

    try:
        run = Storage(args.run_dir, field="RUN_DIR")
        out = Storage(args.out or run.describe(PLOTS_DIR), field="--out")
        written = write_plots(read_results(run), out)
    except ConfigError as error:
        return _config_problems(error, "cannot report")
    print("\n".join(written))
    return 0


def _status(args: argparse.Namespace) -> int:
    import grpc

    from rdml_dist.config.defaults import RPC_CLIENT
    from rdml_dist.rpc.auth import resolve_token
    from rdml_dist.rpc.channel import StatusClient, describe, status_code
    from rdml_dist.rpc.status import render_status

    rpc = RPC_CLIENT
    client = StatusClient(args.coordinator, rpc, resolve_token(rpc, args.token), args.ca_file)
    try:
        updates = client.watch(args.interval) if args.watch else iter([client.status(timeout_s=10)])
        for status in updates:
            print(render_status(status) + ("\n" if args.watch else ""), flush=True)
    except grpc.RpcError as error:
        if args.watch and status_code(error) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            print("rdml-dist: the coordinator went away (the run ended or failed)", file=sys.stderr)
            return 0
        print(f"rdml-dist: cannot read the cohort's status at {args.coordinator}: {describe(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def _student(args: argparse.Namespace) -> int:
    from rdml_dist.config import load_config
    from rdml_dist.external_student import run_external_student
    from rdml_dist.rpc.auth import resolve_token

    try:
        config = load_config(args.config, args.overrides)
        result = run_external_student(config, args.name, args.coordinator, resolve_token(config.rpc, args.token), args.ca_file)
    except ConfigError as error:
        return _config_problems(error)
    print(f"rdml-dist: student {result.student} finished at step {result.steps} ({result.evaluations} evaluations, "
          f"{result.rejoins} rejoins, {result.recoveries} non-finite recoveries)")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from rdml_dist.tune import TUNE_MISSING, tune_available

    if not tune_available():
        print(f"rdml-dist: {TUNE_MISSING}", file=sys.stderr)
        return 2
    from rdml_dist.tune.command import tune_command

    try:
        return tune_command(args.config, args.resume, args.address)
    except ConfigError as error:
        return _config_problems(error, "invalid sweep")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train, "validate": _validate, "student": _student, "status": _status, "report": _plots,
    "tune": _tune,
}


if __name__ == "__main__":
    sys.exit(main())
