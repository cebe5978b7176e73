"""``rdml-dist tune`` on a simulated two-node cluster: α ∈ {0, 2} × 2 seeds on digits with 30% label noise,
two trials at a time, each trial a whole cohort inside its own placement group."""

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_placement_groups
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rdml_dist.cli import main
from rdml_dist.tune.runner import run_sweep, write_outputs
from tests.integration.tune_cluster import cohort_pids, noisy_digits, placements, sweep_of, two_node_cluster

COHORT_CLASSES = ("StudentActor", "Coordinator")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as started:
        yield started


@pytest.mark.timeout(900)
def test_sweep_of_whole_cohorts_each_in_its_own_placement_group(cluster: Cluster, tmp_path: Path) -> None:
    sweep = sweep_of(tmp_path, {"mimicry.alpha": {"grid": [0.0, 2.0]}, "seed": {"grid": [0, 1]}}, max_concurrent_trials=2)
    base = noisy_digits()
    outputs = write_outputs(run_sweep(sweep, base), sweep, base)
    directory = tmp_path / "sweep"

    rows = list(csv.DictReader((directory / "sweep_results.csv").open()))
    assert sorted((float(row["mimicry.alpha"]), int(row["seed"])) for row in rows) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert [row["status"] for row in rows] == ["completed"] * 4
    assert [row["epochs"] for row in rows] == ["2"] * 4
    finals = [float(row["final ensemble/val_accuracy"]) for row in rows]
    assert finals == sorted(finals, reverse=True) and finals[-1] > 0.2  # ranked; chance is 0.1
    for row in rows:  # Tune's own files for every trial
        trial = directory / row["trial"]
        assert {"params.json", "result.json", "progress.csv"} <= {path.name for path in trial.iterdir()}
        assert list(trial.glob("events.out.tfevents.*")), "no TensorBoard events"
        reported = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert {"student/mlp/val_accuracy", "student/cnn/train_mimicry", "alpha", "lambda"} <= set(reported[-1])
        assert len(list(trial.glob("checkpoint_*"))) <= sweep.checkpoints_to_keep
    assert {path.name for path in outputs["files"]} >= {"metric_by_mimicry.alpha.png", "metric_by_seed.png", "learning_curves.png"}

    # Ray's state API: each trial's driver, coordinator and students share one placement group of their own.
    address = cluster.address
    actors = list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
    groups = {group.placement_group_id: group for group in list_placement_groups(address=address, detail=True, limit=10_000)}
    trial_groups, nodes = set(), set()
    for row in rows:
        pids = cohort_pids(directory / "runs" / row["trial"])
        cohort = [actor for actor in actors if actor.pid in pids and actor.class_name in COHORT_CLASSES]
        assert len(cohort) == 3, cohort
        group_ids = {actor.placement_group_id for actor in cohort}
        assert len(group_ids) == 1 and None not in group_ids, group_ids
        group = group_ids.pop()
        members = [actor for actor in actors if actor.placement_group_id == group]
        drivers = [actor for actor in members if actor.class_name not in COHORT_CLASSES]
        assert len(drivers) == 1, members  # the trial's own function, in bundle 0
        assert [bundle["unit_resources"] for bundle in groups[group].bundles] == [
            {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 1.0}]
        trial_groups.add(group)
        nodes |= {actor.node_id for actor in cohort}
    assert len(trial_groups) == 4 and len(nodes) == 2

    # Monitoring: each trial served its metrics as run <trial id> on its own port; ended trials left file_sd.
    runs = [directory / "runs" / row["trial"] for row in rows]
    assert [yaml.safe_load((run / "config.yaml").read_text())["name"] for run in runs] == [row["trial"] for row in rows]
    assert len({placements(run)["coordinator"]["metrics"] for run in runs}) == 4
    for run in runs:  # a trial's cohort writes TensorBoard events as any run does, read back by TensorBoard's reader
        epochs = json.loads((run / "results.json").read_text())["epochs"]
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        for name in ("mlp", "cnn"):
            points = events.Scalars(f"student/{name}/val_accuracy")
            assert [point.step for point in points] == [entry["epoch"] for entry in epochs] == [0, 1]
            assert [point.value for point in points] == pytest.approx([entry["students"][name]["val_accuracy"] for entry in epochs])
    assert json.loads((directory / "file_sd.json").read_text()) == []

    # best.yaml is a whole experiment: `rdml-dist train best.yaml` gives the best trial's final accuracies again.
    best = rows[0]
    assert yaml.safe_load((directory / "best.yaml").read_text())["mimicry"]["alpha"] == float(best["mimicry.alpha"])
    again = tmp_path / "again"
    assert main(["train", str(directory / "best.yaml"), "--run-dir", str(again), "--no-progress"]) == 0
    trial_summary = json.loads((directory / "runs" / best["trial"] / "results.json").read_text())["summary"]
    train_summary = json.loads((again / "results.json").read_text())["summary"]
    for name in ("mlp", "cnn", "ensemble"):
        assert train_summary[name]["final_val_accuracy"] == trial_summary[name]["final_val_accuracy"], name
