"""The step log as append-only parts, epoch sums across chunks, small manifests, and rollbacks that keep every fault.

A run is driven through the real RunDirectory, CheckpointStore and Storage with made-up step
records, on a local directory and on fsspec's in-memory object store (where nothing is appended).
"""

import csv
import io
import json
import math
import random
import uuid
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest

from rdml_dist.run_records.checkpoints import FORMAT, MANIFEST, CheckpointStore, checkpoint_directory
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.coordinator_core.coordinator import EpochEvaluation, StepRecord
from rdml_dist.run_records.run_directory import RESULTS_JSON, RunDirectory
from rdml_dist.run_records.run_summary import TIMING_KEYS, RunSummary
from rdml_dist.errors import ConfigError
from rdml_dist.run_records.step_log import COLUMNS, WHOLE_LOG, decode, encode, part_name, parts, read_step_log, truncate, write_part
from rdml_dist.run_records.storage import Storage

STUDENTS = ("a", "b", "c")
STEPS_PER_EPOCH = 10


def experiment(location: str, epochs: int = 3, **training: Any) -> ExperimentConfig:
    return parse_config({
        "name": "log", "students": [{"model": "mlp", "name": name} for name in STUDENTS],
        "training": {"epochs": epochs, **training}, "runtime": {"engine": "local", "run_dir": location},
    })


def record(step: int, student: str, rng: random.Random) -> StepRecord:
    nan_or = (lambda value: math.nan if rng.random() < 0.2 else value)  # some steps measure no timings
    return StepRecord(
        step=step, epoch=step // STEPS_PER_EPOCH, student=student, ce_loss=rng.uniform(0, 3), mimicry_loss=rng.uniform(0, 1),
        divergence=rng.uniform(0, 1), alpha=1 + step / 100, weight=0.5, correct=rng.randint(0, 32), labelled=32,
        correct_clean=rng.randint(0, 32), rows=32, wait_seconds=rng.uniform(0, 1e-3), coordinator_seconds=rng.uniform(0, 1e-3),
        compute_seconds=nan_or(rng.uniform(0, 1e-2)), round_trip_seconds=nan_or(rng.uniform(0, 1e-2)),
    )


def chunk(start: int, end: int, seed: int) -> list[StepRecord]:
    rng = random.Random(seed * 100_003 + start)
    return [record(step, student, rng) for step in range(start, end) for student in STUDENTS]


class Driver:
    """What the epoch loop does with a run directory: chunks of steps ending at checkpoint points."""

    def __init__(self, storage: Storage, config: ExperimentConfig, every: int, resume: bool = False) -> None:
        self.storage, self.config, self.every = storage, config, every
        self.checkpoints = CheckpointStore(storage)
        start = self.checkpoints.latest() if resume else None
        self.run = RunDirectory(storage, config, "local", resume_from=start)
        if start is None:
            self.run.write_config()
            self.checkpoint(0)
        self.step = 0 if start is None else start["step"]

    def checkpoint(self, step: int) -> dict[str, Any]:
        self.run.write_progress()
        manifest = self.run.manifest(step, live=[])
        self.checkpoints.commit(manifest)
        self.checkpoints.prune(self.config.runtime.checkpoint.keep)
        return manifest

    def chunk(self, seed: int = 0, checkpoint: bool = True) -> int:
        end = min((self.step // self.every + 1) * self.every, (self.step // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH)
        self.run.add_records(chunk(self.step, end, seed))
        if end % STEPS_PER_EPOCH == 0:
            epoch = end // STEPS_PER_EPOCH - 1
            self.run.record_epoch(epoch, EpochEvaluation(epoch, dict.fromkeys(STUDENTS, 0.5 + epoch / 10), 0.7), 1.0)
        if checkpoint:
            self.checkpoint(end)
        self.step = end
        return end

    def until(self, step: int) -> None:
        while self.step < step:
            self.chunk()


def texts(rows: list[StepRecord]) -> list[str]:
    """Records compared as text (NaN is a value here: a timing not measured)."""
    return [repr(astuple(row)) for row in rows]


def expected_summary(rows: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Per-student epoch means computed the plain way, from all of the epoch's rows at once."""
    def mean(values: list[float]) -> float:
        finite = [value for value in values if not math.isnan(value)]
        return sum(finite) / len(finite) if finite else math.nan

    summary = {}
    for student in STUDENTS:
        mine = [row for row in rows if row.student == student]
        summary[student] = {
            "train_ce": mean([row.ce_loss for row in mine]),
            "train_accuracy": sum(row.correct for row in mine) / sum(row.labelled for row in mine),
            "round_trip_seconds": mean([row.round_trip_seconds for row in mine]),
            "compute_seconds": mean([row.compute_seconds for row in mine]),
            "steps": len(mine),
        }
    return summary


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A local directory, or fsspec's in-memory object store (no appends, no renames)."""
    return Storage(str(tmp_path / "run") if request.param == "local" else f"memory://rdml-test-{uuid.uuid4().hex}/run")


def test_each_chunk_is_one_part_and_the_readers_see_one_log(storage: Storage) -> None:
    driver = Driver(storage, experiment(storage.url), every=4)
    driver.until(20)
    chunks = [(0, 3), (4, 7), (8, 9), (10, 11), (12, 15), (16, 19)]  # every 4 steps and at each epoch's end
    assert [(first, last) for first, last, _ in parts(storage)] == chunks
    assert driver.run.rows == []  # nothing of the run is held once its chunk is written
    expected = [row for first, last in chunks for row in chunk(first, last + 1, 0)]
    assert texts(read_step_log(storage)) == texts(expected)
    assert not storage.exists(WHOLE_LOG)  # the run is not over
    driver.until(30)
    whole = storage.read_bytes(WHOLE_LOG).decode().splitlines()
    assert len(whole) == 1 + 30 * len(STUDENTS) and whole[0].startswith("step,epoch,student")
    assert [line.split(",")[:3] for line in whole[1:]] == [[str(row.step), str(row.epoch), row.student] for row in read_step_log(storage)]


def test_epoch_summaries_over_several_chunks_match_the_whole_epoch(storage: Storage) -> None:
    driver = Driver(storage, experiment(storage.url), every=3)
    driver.until(30)
    results = json.loads(storage.read_bytes(RESULTS_JSON))
    rows = read_step_log(storage)
    for entry in results["epochs"]:
        expected = expected_summary([row for row in rows if row.epoch == entry["epoch"]])
        for student in STUDENTS:
            got = entry["students"][student]
            for key, value in expected[student].items():
                assert got[key] == value or (got[key] is None and math.isnan(value)), (entry["epoch"], student, key)
        assert entry["alpha"] == [row for row in rows if row.epoch == entry["epoch"]][-1].alpha


def test_a_rollback_drops_later_parts_and_keeps_the_faults_of_the_rolled_back_chunk(storage: Storage) -> None:
    driver = Driver(storage, experiment(storage.url), every=4)
    driver.until(12)  # checkpoints at 4, 8, 10, 12; epoch 0 done
    manifest = driver.checkpoints.latest()
    driver.chunk(seed=1, checkpoint=False)  # steps 12-15 are lost with a failure before their checkpoint...
    driver.run.write_progress()  # ...after their part was written (a crash between part and manifest)
    fault = {"kind": "student_failure", "student": "b", "step": 14, "cause": "killed"}
    driver.run.add_events([fault])
    assert (12, 15) in [(first, last) for first, last, _ in parts(storage)]
    driver.run.rollback(manifest)
    assert [last for _, last, _ in parts(storage)][-1] == 11
    driver.step = manifest["step"]
    driver.until(30)
    steps = [(row.step, row.student) for row in read_step_log(storage)]
    assert steps == [(step, student) for step in range(30) for student in STUDENTS]  # every step exactly once
    assert texts([row for row in read_step_log(storage) if row.step >= 12 and row.epoch == 1]) == \
        texts(chunk(12, 16, 0) + chunk(16, 20, 0))  # the redone chunk, not the lost one
    results = json.loads(storage.read_bytes(RESULTS_JSON))
    assert results["faults"]["events"] == [fault] and results["faults"]["counts"] == {"student_failure": 1}


def test_a_part_across_the_checkpoint_keeps_only_its_earlier_rows(storage: Storage) -> None:
    write_part(storage, chunk(0, 4, 0))
    write_part(storage, chunk(4, 9, 0))
    truncate(storage, 6)
    assert [(first, last) for first, last, _ in parts(storage)] == [(0, 3), (4, 5)]
    assert texts(read_step_log(storage)) == texts((chunk(0, 4, 0) + chunk(4, 9, 0))[:len(STUDENTS) * 6])


@pytest.mark.parametrize("stopped_at", [4, 16])  # in the first epoch (no epoch in results.json yet), in the second
def test_resume_restores_epochs_faults_and_the_open_epoch_exactly(storage: Storage, tmp_path: Path, stopped_at: int) -> None:
    whole = Storage(str(tmp_path / "whole"))
    Driver(whole, experiment(whole.url), every=4).until(30)

    config = experiment(storage.url)
    first = Driver(storage, config, every=4)
    first.until(stopped_at)  # mid-epoch: its sums so far travel in the manifest
    assert RunDirectory(storage, config, "local", resume_from=first.checkpoints.latest()).epochs == first.run.epochs
    first.run.add_events([{"kind": "student_failure", "student": "a", "step": 17, "cause": "killed"}])
    first.chunk(seed=2, checkpoint=False)
    first.run.write_progress()  # the driver dies after the chunk's part but before its manifest
    resumed = Driver(storage, config, every=4, resume=True)
    assert resumed.step == stopped_at
    resumed.until(30)

    def epochs(location: Storage) -> list[dict[str, Any]]:
        return [{**entry, "seconds": None} for entry in json.loads(location.read_bytes(RESULTS_JSON))["epochs"]]

    assert epochs(storage) == epochs(whole)
    assert texts(read_step_log(storage)) == texts(read_step_log(whole))
    assert storage.read_bytes(WHOLE_LOG) == whole.read_bytes(WHOLE_LOG)
    assert json.loads(storage.read_bytes(RESULTS_JSON))["faults"]["counts"] == {"student_failure": 1}


def test_manifests_stay_small_however_long_the_run(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "long"))
    driver = Driver(storage, experiment(storage.url, epochs=40), every=5)
    sizes = {}
    for epoch in range(40):
        driver.run.add_events([{"kind": "non_finite", "student": "a", "step": driver.step, "cause": "NaN"}])
        driver.until((epoch + 1) * STEPS_PER_EPOCH - 5)  # a mid-epoch checkpoint: one epoch open
        sizes[epoch] = len(json.dumps(driver.checkpoints.latest()))
        driver.until((epoch + 1) * STEPS_PER_EPOCH)
    assert sizes[39] == pytest.approx(sizes[1], rel=0.05)  # the same fields, whatever the epochs and events so far
    assert len(json.loads(storage.read_bytes(RESULTS_JSON))["faults"]["events"]) == 40


def test_a_fresh_run_starts_from_an_empty_log(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    write_part(storage, chunk(0, 5, 9))  # left by a run that never completed a checkpoint
    storage.write_bytes(WHOLE_LOG, b"stale")
    Driver(storage, experiment(storage.url), every=4).until(4)
    assert not storage.exists(WHOLE_LOG) and [name for _, _, name in parts(storage)] == [part_name(0, 3)]


def test_a_run_from_before_parts_resumes_from_its_whole_log(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "old"))
    rows = chunk(0, 8, 0)
    storage.write_bytes(WHOLE_LOG, encode(rows))
    assert texts(read_step_log(storage)) == texts(rows)
    truncate(storage, 6)
    assert texts(read_step_log(storage)) == texts([row for row in rows if row.step < 6])
    assert [(first, last) for first, last, _ in parts(storage)] == [(0, 5)] and not storage.exists(WHOLE_LOG)


def test_the_running_summary_equals_the_summary_of_all_epochs_at_once() -> None:
    rng = random.Random(3)
    maybe = (lambda value: rng.choice([value, value, math.nan, None]))
    entries = [{"epoch": epoch, "ensemble_val_accuracy": maybe(rng.random()), "students": {
        name: {"val_accuracy": maybe(rng.random()), **{key: maybe(rng.random()) for key in TIMING_KEYS}} for name in STUDENTS}}
        for epoch in range(40)]
    summary = RunSummary(list(STUDENTS), last_k=5)
    for count, entry in enumerate(entries, start=1):
        summary.add(entry)
        assert repr(summary.result()) == repr(summary_at_once(entries[:count], 5))
    assert repr(RunSummary(list(STUDENTS), 5, entries[:17]).result()) == repr(summary_at_once(entries[:17], 5))  # a rollback's


def summary_at_once(epochs: list[dict[str, Any]], last_k: int) -> dict[str, dict[str, Any]]:
    """The summary computed from every epoch at once, as results.json always described it."""
    def mean(values: list[Any]) -> float:
        known = [value for value in values if value is not None and not math.isnan(value)]
        return sum(known) / len(known) if known else math.nan

    series = {name: [entry["students"][name]["val_accuracy"] for entry in epochs] for name in STUDENTS}
    series["ensemble"] = [entry["ensemble_val_accuracy"] for entry in epochs]
    result = {}
    for name, accuracies in series.items():
        known = [value for value in accuracies if value is not None and not math.isnan(value)]
        result[name] = {"final_val_accuracy": accuracies[-1] if accuracies else math.nan,
                        "best_val_accuracy": max(known, default=math.nan),
                        f"mean_last_{last_k}_val_accuracy": mean(known[-last_k:])}
        if name != "ensemble":
            for key in TIMING_KEYS:
                result[name][f"mean_{key}"] = mean([entry["students"][name].get(key) for entry in epochs])
    return result


def test_a_checkpoint_from_before_results_held_the_epochs_restores_from_its_manifest(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "old"))
    storage.write_bytes(WHOLE_LOG, encode(chunk(0, 12, 0)))
    epoch = {"epoch": 0, "seconds": 1.0, "alpha": 1.0, "mimicry_weight": 0.5, "ensemble_val_accuracy": 0.7,
             "students": {name: {"val_accuracy": 0.5} for name in STUDENTS}}
    event = {"kind": "non_finite", "student": "a", "step": 3, "cause": "NaN"}
    manifest = {"step": 10, "epochs_done": 1, "members": list(STUDENTS), "live": list(STUDENTS), "engine": "local",
                "epochs": [epoch], "events": [event]}
    run = RunDirectory(storage, experiment(storage.url), "local", resume_from=manifest)
    assert run.epochs == [epoch] and run.events == [event]
    assert [row.step for row in read_step_log(storage)][-1] == 9


def test_a_whole_log_write_that_fails_midway_leaves_no_truncated_file(storage: Storage) -> None:
    def rows_then_failure() -> Any:
        yield b"step,student\n"
        raise OSError("the part could not be read")

    with pytest.raises(OSError, match="could not be read"):
        storage.write_chunks(WHOLE_LOG, rows_then_failure())
    assert not storage.exists(WHOLE_LOG)
    assert storage.list_files("") == []
    storage.write_chunks(WHOLE_LOG, iter([b"step,student\n", b"0,a\n"]))
    assert storage.read_bytes(WHOLE_LOG) == b"step,student\n0,a\n"


PREVIOUS_COLUMNS = [name for name in COLUMNS if name not in ("compute_seconds", "round_trip_seconds")]


def _rewrite_in_the_previous_format(storage: Storage) -> None:
    """Parts without the timing columns, manifests without a format: a run directory as format 1 wrote it."""
    for _, _, name in parts(storage):
        rows = list(csv.DictReader(io.StringIO(storage.read_bytes(name).decode())))
        lines = io.StringIO()
        writer = csv.DictWriter(lines, PREVIOUS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        storage.write_bytes(name, lines.getvalue().encode())
    for step in CheckpointStore(storage).complete_steps():
        name = f"{checkpoint_directory(step)}/{MANIFEST}"
        manifest = json.loads(storage.read_bytes(name))
        assert manifest.pop("format") == FORMAT
        storage.write_bytes(name, json.dumps(manifest).encode())


def test_a_run_directory_in_the_previous_format_resumes_its_missing_fields_read_as_absent(storage: Storage, tmp_path: Path) -> None:
    whole = Storage(str(tmp_path / "whole"))
    Driver(whole, experiment(whole.url), every=4).until(30)
    config = experiment(storage.url)
    Driver(storage, config, every=4).until(16)
    _rewrite_in_the_previous_format(storage)
    resumed = Driver(storage, config, every=4, resume=True)
    assert resumed.step == 16
    resumed.until(30)

    def without_timings(rows: list[StepRecord]) -> list[tuple[Any, ...]]:
        return [astuple(row)[:len(PREVIOUS_COLUMNS)] for row in rows]

    rows = read_step_log(storage)
    assert without_timings(rows) == without_timings(read_step_log(whole))
    assert texts(list(decode(storage.read_bytes(WHOLE_LOG)))) == texts(rows)  # the joined log: one header, today's columns
    assert all(math.isnan(row.compute_seconds) for row in rows if row.step < 16)  # absent in the older parts
    assert all(row.compute_seconds == whole_row.compute_seconds or math.isnan(whole_row.compute_seconds)
               for row, whole_row in zip(rows, read_step_log(whole)) if row.step >= 16)
    assert CheckpointStore(storage).latest()["format"] == FORMAT  # what it writes now is the current format


def test_a_part_from_a_newer_version_is_refused_naming_its_unknown_column(storage: Storage) -> None:
    storage.write_bytes(part_name(0, 0), encode(chunk(0, 1, 0)).replace(b"round_trip_seconds", b"round_trip_seconds,gradient_norm", 1))
    with pytest.raises(ValueError, match=r"steps/part-00000000-00000000\.csv has columns \['gradient_norm'\] that this rdml-dist does not know"):
        read_step_log(storage)


def test_a_manifest_from_a_newer_format_is_refused_naming_both_formats(storage: Storage) -> None:
    storage.write_bytes(f"{checkpoint_directory(4)}/{MANIFEST}", json.dumps({"format": FORMAT + 1, "step": 4}).encode())
    with pytest.raises(ConfigError, match=rf"is in format {FORMAT + 1}, newer than this rdml-dist reads \({FORMAT}\)"):
        CheckpointStore(storage).latest()
