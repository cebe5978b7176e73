"""A restored trial continues from the cohort checkpoint Ray Tune holds, whatever the run has pruned since."""

import json
from pathlib import Path

import pytest
from ray.tune import Checkpoint

from rdml_dist.run_records.checkpoints import MANIFEST, CheckpointStore, checkpoint_directory
from rdml_dist.run_records.storage import Storage
from rdml_dist.tune.trainable import rewind_to_tune_checkpoint


def _write_checkpoint(directory: Path, step: int) -> None:
    directory.mkdir(parents=True)
    (directory / "mlp.pt").write_bytes(f"weights at {step}".encode())
    (directory / MANIFEST).write_text(json.dumps({"step": step, "live": ["mlp"]}))


@pytest.mark.parametrize("pruned", [True, False], ids=["pruned-by-the-run", "still-in-the-run"])
def test_the_run_is_rewound_to_the_checkpoint_tune_reported(tmp_path: Path, pruned: bool) -> None:
    run = tmp_path / "run"
    for step in (12, 16, 20):
        _write_checkpoint(run / checkpoint_directory(step), step)
    tune_copy = tmp_path / "tune" / "checkpoint_000000"
    _write_checkpoint(tune_copy, 12)
    if pruned:  # keep: 2 removed it after the two newer checkpoints were committed
        Storage(str(run), field="x").delete(checkpoint_directory(12))

    rewind_to_tune_checkpoint(Storage(str(run)), Checkpoint.from_directory(str(tune_copy)))

    store = CheckpointStore(Storage(str(run), field="x"))
    assert store.complete_steps() == [12]
    assert store.latest() == {"step": 12, "live": ["mlp"]}
    assert (run / checkpoint_directory(12) / "mlp.pt").read_bytes() == b"weights at 12"
