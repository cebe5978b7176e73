"""``rdml-dist``: validate an experiment config or train a cohort with the local or Ray engine."""

import argparse
import sys

from rdml_dist.config import ExperimentConfig, load_config
from rdml_dist.engines import train_cohort
from rdml_dist.errors import ClusterError, ConfigError


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
    train.add_argument("--run-dir", help="override runtime.run_dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    return parser


def _engine_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "engine", None):
        overrides.append(f"runtime.engine={args.engine}")
    if getattr(args, "address", None):
        overrides.append(f"runtime.ray.address={args.address}")
    if getattr(args, "run_dir", None):
        overrides.append(f"runtime.run_dir={args.run_dir}")
    return overrides


def _train(config: ExperimentConfig, show_progress: bool) -> int:
    run = train_cohort(config, show_progress=show_progress)
    print(run.finish())
    print(f"\nresults: {run.path / 'results.json'}  table: {run.path / 'results.txt'}  checkpoints: {run.path / 'checkpoints'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, _engine_overrides(args))
    except ConfigError as error:
        print(f"rdml-dist: invalid config: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        source = args.config or "the embedded default"
        print(f"{source}: valid ({len(config.students)} students: {', '.join(config.student_names())}; "
              f"{config.mimicry.divergence}, alpha={config.mimicry.alpha}; engine {config.runtime.engine})")
        return 0
    try:
        return _train(config, show_progress=not args.no_progress)
    except ClusterError as error:
        print(f"rdml-dist: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
