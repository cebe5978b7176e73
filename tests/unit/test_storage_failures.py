"""The run's storage failing in the driver's own work goes to the failure policy like any other failure.

A full disk or an object store's outage while committing a checkpoint is counted against
``runtime.fault.max_failures`` and answered by going back to the latest complete checkpoint, so the
run ends as if nothing had happened; past the budget (or under ``fail``) the run stops and its
``results.json`` says why. Faults are injected at the driver's own write of the manifest, the real
local engine does the rest.
"""

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.config import parse_config
from rdml_dist.engines import local
from rdml_dist.engines.failure_policy import RunFailed
from rdml_dist.engines.local import train_local
from rdml_dist.run_records.step_log import read_step_log
from rdml_dist.run_records.storage import Storage

STEPS = 6  # one epoch of the digits at batch 256, a checkpoint every 2 steps


def _config(run_dir: Path, **fault: Any) -> Any:
    return parse_config({
        "name": "storage",
        "seed": 1,
        "students": [{"model": "mlp", "name": "mlp"}, {"model": "small_cnn", "name": "cnn", "options": {"width": 8}}],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.05}},
        "runtime": {"engine": "local", "run_dir": str(run_dir), "torch_threads": 1,
                    "checkpoint": {"every_steps": 2, "keep": 100}, "fault": fault},
    })


def _fail_commits(monkeypatch: pytest.MonkeyPatch, steps: set[int], times: int = 1) -> list[int]:
    """The manifest of each step in ``steps`` cannot be written (ENOSPC) the first ``times`` times; returns the steps
    whose commit failed, in order."""
    failed: list[int] = []
    commit = CheckpointStore.commit

    def commit_or_fail(store: CheckpointStore, manifest: Any) -> None:
        if manifest["step"] in steps and failed.count(manifest["step"]) < times:
            failed.append(manifest["step"])
            raise OSError(errno.ENOSPC, "No space left on device", f"checkpoints/step-{manifest['step']:08d}/manifest.json")
        commit(store, manifest)

    monkeypatch.setattr(CheckpointStore, "commit", commit_or_fail)
    return failed


def _results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _steps(run_dir: Path) -> list[tuple[int, str, float, float]]:
    return sorted((row.step, row.student, row.ce_loss, row.mimicry_loss) for row in read_step_log(Storage(str(run_dir))))


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    train_local(_config(run_dir), run_dir, show_progress=False)
    return run_dir


@pytest.mark.parametrize("step,back_to", [(4, "step 2"), (0, "the initial state")])
def test_a_checkpoint_that_cannot_be_written_rolls_back_and_the_run_ends_as_undisturbed(
    undisturbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int, back_to: str
) -> None:
    failed = _fail_commits(monkeypatch, {step})
    train_local(_config(tmp_path / "run"), tmp_path / "run", show_progress=False)
    assert failed == [step]
    (event,) = _results(tmp_path / "run")["faults"]["events"]
    assert (event["kind"], event["step"], event["action"]) == ("storage_error", step, f"rolled back to {back_to}")
    assert "No space left on device" in event["cause"] and "student" not in event
    assert _steps(tmp_path / "run") == _steps(undisturbed)  # every step once, with the same losses
    mine, theirs = _results(tmp_path / "run")["epochs"], _results(undisturbed)["epochs"]
    assert [entry["ensemble_val_accuracy"] for entry in mine] == [entry["ensemble_val_accuracy"] for entry in theirs]


def test_storage_that_keeps_failing_stops_the_run_past_the_budget_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = _fail_commits(monkeypatch, {4}, times=10)
    with pytest.raises(RunFailed, match=r"3 failures, more than runtime.fault.max_failures=2: .*the run's storage failed at step 4"):
        train_local(_config(tmp_path / "run", max_failures=2), tmp_path / "run", show_progress=False)
    assert failed == [4, 4, 4]
    events = _results(tmp_path / "run")["faults"]["events"]
    assert [(event["kind"], event["action"]) for event in events] == [
        ("storage_error", "rolled back to step 2"), ("storage_error", "rolled back to step 2"), ("storage_error", "the run stopped")]


def test_under_fail_the_first_storage_error_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_commits(monkeypatch, {2})
    with pytest.raises(RunFailed, match="the run's storage failed at step 2: OSError: .*No space left on device"):
        train_local(_config(tmp_path / "run", on_student_failure="fail"), tmp_path / "run", show_progress=False)
    assert [event["kind"] for event in _results(tmp_path / "run")["faults"]["events"]] == ["storage_error"]


def test_a_checkpoint_that_cannot_be_found_after_one_was_written_is_the_storage_failing_not_a_fresh_start(
    undisturbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that comes back empty (a local directory the driver may no longer read, an object store's outage)
    must not send a cohort that has trained back to its initial state under a step-0 checkpoint of trained weights."""
    failed = _fail_commits(monkeypatch, {4})
    latest, empty_listings = CheckpointStore.latest, [None, None]  # the event's account of it, then the rolling back

    def empty_after_the_failure(store: CheckpointStore) -> Any:
        return empty_listings.pop() if failed and empty_listings else latest(store)

    monkeypatch.setattr(CheckpointStore, "latest", empty_after_the_failure)
    train_local(_config(tmp_path / "run"), tmp_path / "run", show_progress=False)
    events = _results(tmp_path / "run")["faults"]["events"]
    assert [(event["kind"], event["step"], event["action"]) for event in events] == [
        ("storage_error", 4, "rolled back to the latest checkpoint (none found)"), ("storage_error", 2, "rolled back to step 2")]
    assert "no complete checkpoint found" in events[1]["cause"]
    assert _steps(tmp_path / "run") == _steps(undisturbed)


def test_events_the_cohort_still_holds_reach_the_results_when_any_error_ends_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = {"kind": "student_died", "student": "cnn", "step": 2, "cause": "its process was replaced",
            "action": "found replaced by a new process"}

    class HoldsAnEventThenBreaks(local.LocalCohort):
        """Meets a failure while scoring (held, as the Ray cohort holds one it found), then an error no policy answers."""

        held: list[dict[str, Any]] = []

        def pop_events(self) -> list[dict[str, Any]]:
            events, self.held = self.held, []
            return events

        def evaluate(self, epoch: int) -> Any:
            self.held = [held]
            raise KeyboardInterrupt

    monkeypatch.setattr(local, "LocalCohort", HoldsAnEventThenBreaks)
    with pytest.raises(KeyboardInterrupt):
        train_local(_config(tmp_path / "run"), tmp_path / "run", show_progress=False)
    assert held in _results(tmp_path / "run")["faults"]["events"]
