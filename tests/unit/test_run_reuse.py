"""What ``rdml-dist train CONFIG`` does with a run directory that already holds a run (a retried job, a second try).

The runs are real: made by the local engine through the command line, or by the RunDirectory and
CheckpointStore themselves for the cases that need no training.
"""

import json
import socket
from pathlib import Path

import pytest
import yaml

from rdml_dist.run_records.checkpoints import CheckpointStore, checkpoint_directory
from rdml_dist.cli import main
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines.session import RunPlan, config_differences
from rdml_dist.engines.session import plan_run as plan_and_hold
from rdml_dist.errors import ConfigError
from rdml_dist.run_records.run_directory import RunDirectory
from rdml_dist.run_records.storage import Storage

TIMINGS = {"seconds", "compute_seconds", "round_trip_seconds", "wait_seconds", "coordinator_seconds", "exchange_overhead_seconds"}


def experiment(run_dir: Path, **training: object) -> ExperimentConfig:
    return parse_config({"name": "reuse", "students": [{"model": "mlp", "name": "a"}, {"model": "mlp", "name": "b"}],
                         "training": {"epochs": 2, **training}, "runtime": {"engine": "local", "run_dir": str(run_dir)}})


def plan_run(config: ExperimentConfig, overwrite: bool = False) -> RunPlan:
    """The plan of a driver that then goes away: its lease released, as a finished driver leaves it."""
    plan = plan_and_hold(config, overwrite=overwrite)
    plan.lease.release()
    return plan


def saved_run(config: ExperimentConfig, epochs_done: int, location: str | None = None) -> Storage:
    """A run directory as the loop leaves it after ``epochs_done`` epochs (no students' files: none are read here)."""
    storage = Storage(location or config.resolved_run_dir())
    run = RunDirectory(storage, config, "local")
    run.write_config()
    run.epochs = [{"epoch": epoch} for epoch in range(epochs_done)]
    CheckpointStore(storage).commit(run.manifest(10 * epochs_done, live=[]))
    return storage


def test_an_unfinished_run_of_the_same_config_is_continued_whatever_the_cluster_address(tmp_path: Path) -> None:
    config = experiment(tmp_path / "run")
    assert plan_run(config).resume is False  # nothing there yet
    saved_run(config, epochs_done=1)
    elsewhere = parse_config({**config.model_dump(mode="json"),
                              "runtime": {**config.model_dump(mode="json")["runtime"], "ray": {"address": "10.0.0.1:6379"}}})
    plan = plan_run(elsewhere)
    assert plan.resume and plan.location == str(tmp_path / "run")
    assert plan.says.startswith(f"resuming the unfinished run at {tmp_path / 'run'} from its checkpoint at step 10")


def test_an_unfinished_run_of_another_config_is_refused_naming_the_fields(tmp_path: Path) -> None:
    saved_run(experiment(tmp_path / "run"), epochs_done=1)
    other = experiment(tmp_path / "run", batch_size=32, last_epochs_reported=2)
    assert config_differences(yaml_of(tmp_path / "run"), other) == ["training.batch_size", "training.last_epochs_reported"]
    with pytest.raises(ConfigError, match=r"holds an unfinished run of another config \(training.batch_size, "
                                          r"training.last_epochs_reported differ\); continue it with `rdml-dist train --resume"):
        plan_run(other)
    assert plan_run(other, overwrite=True).location == str(tmp_path / "run")


def yaml_of(location: Path) -> dict:
    return yaml.safe_load((location / "config.yaml").read_text())


def test_a_finished_run_is_kept_and_the_next_goes_to_a_numbered_sibling(tmp_path: Path) -> None:
    config = experiment(tmp_path / "run")
    finished = saved_run(config, epochs_done=2)
    before = finished.read_bytes("config.yaml")
    plan = plan_run(config)
    assert (plan.location, plan.resume) == (f"{tmp_path / 'run'}-2", False)
    assert plan.says == f"a new run at {tmp_path / 'run'}-2 (the run at {tmp_path / 'run'} finished)"
    saved_run(config, epochs_done=1, location=plan.location)  # that one was interrupted: a retry continues it
    assert (plan_run(config).location, plan_run(config).resume) == (f"{tmp_path / 'run'}-2", True)
    saved_run(config, epochs_done=2, location=plan.location)
    assert plan_run(config).location == f"{tmp_path / 'run'}-3"
    assert plan_run(experiment(tmp_path / "run", batch_size=32)).location == f"{tmp_path / 'run'}-3"  # any config
    assert finished.read_bytes("config.yaml") == before and CheckpointStore(finished).complete_steps() == [20]


CLI_RUN = ["--engine", "local", "--no-progress", "--set", "training.epochs=2", "--set", "training.batch_size=256",
           "--set", "students.2.model=mlp", "--set", "runtime.torch_threads=1", "--set", "monitoring.enabled=false"]


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMINGS and not key.startswith("mean_")}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def test_a_plain_train_continues_an_interrupted_run_and_a_second_one_goes_next_to_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "digits"
    assert main(["train", "--run-dir", str(run_dir), *CLI_RUN]) == 0
    assert capsys.readouterr().out.startswith(f"rdml-dist: a new run at {run_dir}\n")
    whole = json.loads((run_dir / "results.json").read_text())
    steps = CheckpointStore(Storage(str(run_dir))).complete_steps()
    (run_dir / checkpoint_directory(steps[-1]) / "manifest.json").unlink()  # as if killed before its last checkpoint

    assert main(["train", "--run-dir", str(run_dir), *CLI_RUN]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line == (f"rdml-dist: resuming the unfinished run at {run_dir} from its checkpoint at step {steps[-2]} "
                          "(1 of 2 epochs done; its saved config is this one)")
    resumed = json.loads((run_dir / "results.json").read_text())
    assert without_timings(resumed["epochs"]) == without_timings(whole["epochs"])

    assert main(["train", "--run-dir", str(run_dir), *CLI_RUN]) == 0  # a newcomer's second plain run
    assert capsys.readouterr().out.startswith(f"rdml-dist: a new run at {run_dir}-2 (the run at {run_dir} finished)\n")
    assert without_timings(json.loads((tmp_path / "digits-2" / "results.json").read_text())["epochs"]) == \
        without_timings(whole["epochs"])


def test_overwrite_deletes_nothing_before_the_cluster_is_reached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = experiment(tmp_path / "run")
    kept = saved_run(config, epochs_done=2)
    with socket.socket() as probe:  # a loopback port nothing listens on: no cluster there
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--overwrite", *CLI_RUN[2:], "--engine", "ray", "--address", nowhere])
    assert code == 1 and f"no Ray cluster answers at {nowhere}" in capsys.readouterr().err
    assert CheckpointStore(kept).complete_steps() == [20] and kept.exists("config.yaml")


def test_a_token_in_the_config_is_never_saved_and_its_run_still_continues(tmp_path: Path) -> None:
    secret = "s3cret-cohort-token"
    config = parse_config({**experiment(tmp_path / "run").model_dump(mode="json"), "rpc": {"token": secret}})
    storage = saved_run(config, epochs_done=1)
    saved = storage.read_bytes("config.yaml")
    assert secret.encode() not in saved and yaml.safe_load(saved)["rpc"]["token"] is None
    assert config_differences(yaml.safe_load(saved), config) == []  # the same run, token or not
    assert plan_run(config).resume
