"""A sweep's failures on a simulated two-node cluster: ASHA's early stop releases the trial at once, a killed
student is the cohort's own business, an invalid value fails only its trial, and a killed sweep driver resumes."""

import csv
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import tune
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from rdml_dist.tune.runner import run_sweep, write_outputs
from tests.integration.cli_process import RDML_DIST, child_environment, kill_actor_process, run_cli
from tests.integration.conftest import wait_until
from tests.integration.tune_cluster import cohort_pids, noisy_digits, placements, sweep_of, two_node_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as started:
        yield started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Watcher(threading.Thread):
    """Polls while the sweep runs: when each placement group is first seen removed and each cohort process gone,
    and kills the ``cnn`` student of the first trial once that trial has finished its first epoch."""

    def __init__(self, runs: Path) -> None:
        super().__init__(daemon=True)
        self.runs = runs
        self.removed: dict[str, float] = {}
        self.gone: dict[int, float] = {}
        self.killed: tuple[str, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            now = time.time()
            for group, entry in ray.util.placement_group_table().items():
                if entry["state"] == "REMOVED":
                    self.removed.setdefault(group, now)
            for run in self.runs.glob("*/placements.json"):
                for pid in cohort_pids(run.parent):
                    if pid not in self.gone and not _alive(pid):
                        self.gone[pid] = now
            if self.killed is None:
                self._kill_first_trials_student()

    def _kill_first_trials_student(self) -> None:
        for run in self.runs.iterdir():
            results = run / "results.json"
            config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
            if config.get("training", {}).get("optimizer", {}).get("lr") == 0.1 and results.exists():
                if json.loads(results.read_text()).get("epochs"):
                    pid = placements(run)["students"]["cnn"]["pid"]
                    if kill_actor_process(pid, "StudentActor"):  # not a pid its ended process left to another
                        self.killed = (run.name, pid)


class CompletionTimes(tune.Callback):
    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.at[trial.trial_id] = time.time()


@pytest.mark.timeout(900)
def test_asha_stop_killed_student_and_invalid_value(cluster: Cluster, tmp_path: Path) -> None:
    sweep = sweep_of(
        tmp_path, {"training.optimizer.lr": {"grid": [0.1, 1.0e-5, -1.0]}}, max_concurrent_trials=1,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 3},
        max_failures=0,  # a config error fails again on every retry
    )
    base = noisy_digits(epochs=3, batch_size=64)
    watcher, completions = Watcher(tmp_path / "sweep" / "runs"), CompletionTimes()
    (tmp_path / "sweep" / "runs").mkdir(parents=True)
    watcher.start()
    try:
        results = run_sweep(sweep, base, callbacks=[completions])
        time.sleep(3)
    finally:
        watcher.stop.set()
        watcher.join()
    rows = {float(row["training.optimizer.lr"]): row for row in
            csv.DictReader((Path(write_outputs(results, sweep, base)["files"][0])).open())}

    # The invalid value: its trial failed with the one-line config error; the others ran.
    assert rows[-1.0]["status"] == "failed"
    assert rows[-1.0]["error"] == "training.optimizer.lr: Input should be greater than 0"

    # The killed student: its trial completed every epoch through the cohort's policy (a rollback).
    good = rows[0.1]
    assert watcher.killed is not None and watcher.killed[0] == good["trial"]
    assert (good["status"], good["epochs"]) == ("completed", "3")
    events = json.loads((tmp_path / "sweep" / "runs" / good["trial"] / "results.json").read_text())["faults"]["events"]
    assert any(event.get("kind") == "student_died" and event.get("student") == "cnn" for event in events), events

    # ASHA stopped the hopeless trial after its first epoch; its cohort and placement group went within seconds.
    hopeless = rows[1.0e-5]
    assert (hopeless["status"], hopeless["epochs"]) == ("stopped early", "1")
    stopped_at = completions.at[hopeless["trial"]]
    pids = cohort_pids(tmp_path / "sweep" / "runs" / hopeless["trial"])
    assert all(watcher.gone[pid] - stopped_at < 10 for pid in pids), (watcher.gone, stopped_at)
    groups = {actor.placement_group_id for actor in list_actors(address=cluster.address, detail=True, limit=10_000,
                                                                 raise_on_missing_output=False) if actor.pid in pids}
    assert len(groups) == 1
    group = groups.pop()
    assert watcher.removed[group] - stopped_at < 10, (watcher.removed.get(group), stopped_at)


EPOCHS_WHEN_KILLED = 4  # the second trial still has epochs to go when its first report is seen, even on a slow machine


@pytest.mark.timeout(900)
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(cluster: Cluster, tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "sweep", "base": noisy_digits(epochs=EPOCHS_WHEN_KILLED), "space": {"mimicry.alpha": {"grid": [0.0, 2.0]}},
        "max_concurrent_trials": 1, "storage": str(tmp_path),
    }))
    directory = tmp_path / "sweep"
    command = [*RDML_DIST, "tune", str(sweep_file), "--address", cluster.address]
    driver = subprocess.Popen(command, cwd=tmp_path, env=child_environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def second_trial_reported() -> bool:
            reported = sorted(directory.glob("*/result.json"))
            return len(reported) == 2 and all(path.read_text().strip() for path in reported)

        wait_until(second_trial_reported, "the second trial reported its first epoch", timeout_s=600)
        finished = {path.parent.name: path.read_text() for path in directory.glob("*/progress.csv")
                    if len(path.read_text().strip().splitlines()) == 1 + EPOCHS_WHEN_KILLED}  # a header and every epoch
        assert len(finished) == 1, finished
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    wait_until(lambda: not [group for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"],
               "the killed sweep's trials are released", timeout_s=60)

    resumed = run_cli(["tune", str(sweep_file), "--resume", "--address", cluster.address], tmp_path, timeout_s=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = list(csv.DictReader((directory / "sweep_results.csv").open()))
    assert [(row["status"], row["epochs"]) for row in rows] == [("completed", str(EPOCHS_WHEN_KILLED))] * 2
    for trial, progress in finished.items():  # not rerun: Tune's record of the finished trial is as it was
        assert (directory / trial / "progress.csv").read_text() == progress
