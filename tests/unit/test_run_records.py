"""Every run's TensorBoard events and plots, read back with TensorBoard's own reader and Pillow."""

import json
import shutil
from pathlib import Path

import fsspec
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.cli import main
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines import resume_cohort, train_cohort
from rdml_dist.run_records.storage import Storage

EPOCHS = 3
STUDENTS = ("mlp", "cnn")


def tiny_cohort(run_dir: str, epochs: int = EPOCHS) -> ExperimentConfig:
    return parse_config(
        {
            "name": "records",
            "seed": 1,
            "students": [{"model": "mlp", "name": "mlp"}, {"model": "small_cnn", "name": "cnn", "options": {"width": 8}}],
            "training": {"epochs": epochs, "batch_size": 128, "optimizer": {"lr": 0.05}},
            "mimicry": {"alpha": 2.0, "alpha_schedule": {"kind": "cosine", "floor": 0.5}},
            "runtime": {"engine": "local", "run_dir": run_dir, "torch_threads": 1},
            "monitoring": {"enabled": False},
        }
    )


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``directory``'s event files, as TensorBoard itself reads them (orphans purged)."""
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_series(points: list[tuple[int, float]], values: list[float]) -> None:
    """Exactly one point per epoch, in order, equal (as float32) to the values of results.json."""
    assert [step for step, _ in points] == list(range(len(values)))
    assert [value for _, value in points] == pytest.approx(values, rel=1e-6)


def assert_events_match_results(events: dict[str, list[tuple[int, float]]], results: dict) -> None:
    """One point per epoch for every student's validation accuracy (and the rest), equal to results.json."""
    epochs = results["epochs"]
    assert [entry["epoch"] for entry in epochs] == list(range(EPOCHS))
    for name in STUDENTS:
        assert_series(events[f"student/{name}/val_accuracy"], [entry["students"][name]["val_accuracy"] for entry in epochs])
        for tag in ("ce_loss", "mimicry_loss", "train_accuracy"):
            assert [step for step, _ in events[f"student/{name}/{tag}"]] == list(range(EPOCHS))
    assert_series(events["ensemble/val_accuracy"], [entry["ensemble_val_accuracy"] for entry in epochs])
    assert_series(events["cohort/alpha"], [entry["alpha"] for entry in epochs])
    assert events["cohort/alpha"][0][1] > events["cohort/alpha"][-1][1]  # the cosine schedule really moved
    assert [step for step, _ in events["cohort/mimicry_weight"]] == list(range(EPOCHS))


def test_a_resumed_run_continues_its_events_and_every_epoch_is_read_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cohort(tiny_cohort(str(run_dir)), show_progress=False)
    # As if the driver died after writing the last epoch's events but before its checkpoint was complete.
    latest = CheckpointStore(Storage(str(run_dir))).latest()["step"]
    shutil.rmtree(run_dir / "checkpoints" / f"step-{latest:08d}")
    assert CheckpointStore(Storage(str(run_dir))).latest()["epochs_done"] == EPOCHS - 1
    resume_cohort(str(run_dir), show_progress=False)

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session
    assert_events_match_results(scalars(run_dir / "tensorboard"), json.loads((run_dir / "results.json").read_text()))
    assert sorted(path.name for path in (run_dir / "plots").iterdir()) == ["accuracy.png", "losses.png", "timing.png"]


def test_events_of_a_run_on_an_object_store_are_uploaded(tmp_path: Path) -> None:
    """fsspec's in-memory file system stands in for s3://: the events are staged locally and copied into storage."""
    url = "memory://rdml-records-test/run"
    try:
        train_cohort(tiny_cohort(url), show_progress=False)
        memory = fsspec.filesystem("memory")
        local = tmp_path / "downloaded"
        local.mkdir()
        for path in memory.ls("/rdml-records-test/run/tensorboard", detail=False):
            (local / Path(path).name).write_bytes(memory.cat_file(path))
        results = json.loads(memory.cat_file("/rdml-records-test/run/results.json"))
        assert memory.exists("/rdml-records-test/run/plots/accuracy.png")
    finally:
        fsspec.filesystem("memory").rm("/rdml-records-test", recursive=True)
    assert_events_match_results(scalars(local), results)


def test_report_writes_the_plots_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    train_cohort(tiny_cohort(str(run_dir), epochs=2), show_progress=False)
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("accuracy.png", "losses.png", "timing.png"):
        assert str(out / name) in printed
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 600
            low, high = image.convert("L").getextrema()
            assert high - low > 100  # drawn on, not a blank canvas


def test_report_of_a_directory_without_results_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results.json" in capsys.readouterr().err


def test_a_run_that_replaces_another_leaves_none_of_its_events_or_plots(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_cohort(tiny_cohort(str(run_dir), epochs=2), show_progress=False)
    (run_dir / "plots" / "from-before.png").write_bytes(b"not a plot of this run")
    train_cohort(tiny_cohort(str(run_dir), epochs=1), show_progress=False, overwrite=True)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars(run_dir / "tensorboard")["ensemble/val_accuracy"]] == [0]
    assert not (run_dir / "plots" / "from-before.png").exists()
