"""Run state that must survive failures: atomic storage, complete-or-absent checkpoints, CPU-only state,
the failure policy, the chunking of the epoch loop, run-directory safety and non-finite recovery."""

import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rdml_dist.run_records.checkpoints import CheckpointStore, checkpoint_directory, to_cpu
from rdml_dist.config import FaultConfig, parse_config
from rdml_dist.engines import resume_cohort, train_cohort
from rdml_dist.engines.failure_policy import Decision, Failure, FailurePolicy, RunFailed
from rdml_dist.engines.local import train_local
from rdml_dist.engines.loop import next_boundary
from rdml_dist.errors import ConfigError
from rdml_dist.run_records.step_log import read_step_log
from rdml_dist.run_records.storage import Storage, atomic_write
from rdml_dist.students.student import Student


def cohort_config(tmp_path: Path, name: str = "state", **runtime: object) -> object:
    return parse_config({
        "name": name,
        "seed": 1,
        "students": [{"model": "mlp", "name": "mlp"}, {"model": "small_cnn", "name": "cnn", "options": {"width": 8}}],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.05}},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / name), "torch_threads": 1, **runtime},
    })


class Interrupted(Exception):
    """Stands for the process dying in the middle of a write."""


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    storage.write_bytes("results.json", b'{"epoch": 1}')

    def dies_half_way(handle: io.BufferedIOBase) -> None:
        handle.write(b'{"epo')
        raise Interrupted

    with pytest.raises(Interrupted):
        atomic_write(tmp_path / "results.json", dies_half_way)
    assert storage.read_bytes("results.json") == b'{"epoch": 1}'
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_written_files_get_the_usual_mode_not_the_temporary_files_private_one(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared.json", lambda handle: handle.write(b"{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o640  # 0666 less the umask, as open() gives
    atomic_write(tmp_path / "again.json", lambda handle: handle.write(b"{}"))
    assert stat.S_IMODE((tmp_path / "again.json").stat().st_mode) == 0o666 & ~previous


def test_an_interrupted_checkpoint_leaves_the_previous_one_complete_and_usable(tmp_path: Path) -> None:
    config = cohort_config(tmp_path)
    run = train_local(config, tmp_path / "state", show_progress=False)  # checkpoints at steps 0 and 6
    run.finish()
    store = CheckpointStore(Storage(str(tmp_path / "state")))
    assert store.complete_steps() == [0, 6]
    final = torch.load(tmp_path / "state" / checkpoint_directory(6) / "cnn.pt", weights_only=True)
    # A later checkpoint dies half-way: one student's file is in, the other's write was cut short (only its
    # temporary file is left), and the manifest was never written.
    partial = tmp_path / "state" / checkpoint_directory(9)
    partial.mkdir()
    (partial / "mlp.pt").write_bytes((tmp_path / "state" / checkpoint_directory(6) / "mlp.pt").read_bytes())
    (partial / ".cnn.pt.k2j4x9").write_bytes(b"\x80\x02truncat")
    with pytest.raises(RuntimeError, match="checkpoint at step 9 lacks the files of cnn"):
        store.commit({"step": 9, "live": ["mlp", "cnn"], "members": ["mlp", "cnn"]})

    assert store.latest()["step"] == 6  # the interrupted one is never taken for complete
    restored = Student(config, 1)
    restored.restore_from(store, 6, cohort_epoch=1)
    for key, tensor in final["model"].items():
        assert torch.equal(restored.model.state_dict()[key], tensor)
    store.prune(keep=1)
    assert sorted(path.name for path in (tmp_path / "state" / "checkpoints").iterdir()) == ["step-00000006", "step-00000009"]
    assert store.complete_steps() == [6]  # older complete ones go; the newer interrupted one is left for its writer


def test_every_tensor_of_a_students_state_is_on_the_cpu_and_detached(tmp_path: Path) -> None:
    student = Student(cohort_config(tmp_path), 0)
    state = student.state_dict()
    tensors = []

    def collect(value: object) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(state)
    assert len(tensors) > len(list(student.model.parameters()))
    assert all(tensor.device.type == "cpu" and not tensor.requires_grad for tensor in tensors)
    nested = {"a": [torch.ones(2, requires_grad=True)], "b": (torch.zeros(1),), "c": 3}
    moved = to_cpu(nested)
    assert moved["c"] == 3 and isinstance(moved["b"], tuple) and not moved["a"][0].requires_grad


def test_a_gpu_students_cuda_generator_state_survives_a_stay_on_a_cpu(tmp_path: Path) -> None:
    config = cohort_config(tmp_path)
    gpu_state = Student(config, 0).state_dict()
    cuda_generator = torch.arange(16, dtype=torch.uint8)  # what a GPU student saved under cuda_rng_state
    gpu_state["cuda_rng_state"] = cuda_generator
    on_cpu = Student(config, 0)
    on_cpu.load_state_dict(gpu_state)
    assert torch.equal(on_cpu.state_dict()["cuda_rng_state"], cuda_generator)  # carried for the way back to a GPU


def test_failure_policy_decisions_and_budget() -> None:
    died = Failure("student_died", 7, "ActorDiedError: killed", student="cnn", node="n1")
    assert FailurePolicy(FaultConfig()).decide(died) is Decision.RESTART_COHORT
    assert FailurePolicy(FaultConfig(on_student_failure="continue")).decide(died) is Decision.CONTINUE
    coordinator = Failure("coordinator_died", 7, "ActorDiedError")
    assert FailurePolicy(FaultConfig(on_student_failure="continue")).decide(coordinator) is Decision.RESTART_COHORT
    with pytest.raises(RunFailed, match="student 'cnn' on node n1 died at step 7: ActorDiedError: killed"):
        FailurePolicy(FaultConfig(on_student_failure="fail")).decide(died)
    budget = FailurePolicy(FaultConfig(max_failures=1))
    budget.decide(died)
    with pytest.raises(RunFailed, match=r"2 failures, more than runtime.fault.max_failures=1: 1\. student 'cnn'.*2\. the coordinator"):
        budget.decide(coordinator)


@pytest.mark.parametrize("step,every,expected", [(0, None, 12), (12, None, 24), (0, 5, 5), (10, 5, 12), (12, 5, 15), (20, 5, 24)])
def test_chunks_end_at_checkpoint_points_and_epoch_ends(step: int, every: int | None, expected: int) -> None:
    assert next_boundary(step, 12, every) == expected


def test_a_relative_run_dir_inside_a_ray_job_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relative = parse_config({"students": [{"model": "mlp"}], "runtime": {"run_dir": "runs/x"}})
    assert relative.resolved_run_dir() == str(Path.cwd() / "runs" / "x")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match="runtime.run_dir: 'runs/x' is relative, and this driver runs as a Ray job"):
        relative.resolved_run_dir()
    absolute = parse_config({"name": "n", "students": [{"model": "mlp"}], "runtime": {"storage": str(tmp_path)}})
    assert absolute.resolved_run_dir() == str(tmp_path / "n")
    uri = parse_config({"name": "n", "students": [{"model": "mlp"}], "runtime": {"storage": "s3://bucket/runs"}})
    assert uri.resolved_run_dir() == "s3://bucket/runs/n"


def test_a_run_directory_holding_a_run_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    config = cohort_config(tmp_path)
    train_cohort(config, show_progress=False).finish()
    before = (tmp_path / "state" / "results.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run; continue it with `rdml-dist train --resume"):
        train_cohort(config, show_progress=False)
    assert (tmp_path / "state" / "results.json").read_text() == before
    train_cohort(config, show_progress=False, overwrite=True).finish()
    assert CheckpointStore(Storage(str(tmp_path / "state"))).complete_steps() == [0, 6]


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no run"):
        resume_cohort(str(tmp_path / "nothing"), show_progress=False)
    config = cohort_config(tmp_path)
    train_cohort(config, show_progress=False).finish()
    for manifest in (tmp_path / "state" / "checkpoints").glob("*/manifest.json"):
        manifest.unlink()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resume_cohort(str(tmp_path / "state"), show_progress=False)


def test_a_student_with_a_non_finite_loss_goes_back_to_its_checkpoint_and_its_peer_never_sees_it(tmp_path: Path) -> None:
    config = parse_config({
        "name": "nan",
        "seed": 1,
        "students": [
            {"model": "tests.unit.sample_factories:diverges_once", "name": "fragile", "options": {"diverge_at": 4}},
            {"model": "mlp", "name": "steady"},
        ],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.05}},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / "nan"), "torch_threads": 1,
                    "checkpoint": {"every_steps": 2}, "fault": {"nan_lr_backoff": 0.5}},
    })
    run = train_cohort(config, show_progress=False)
    run.finish()
    results = json.loads((tmp_path / "nan" / "results.json").read_text())
    assert results["faults"]["counts"] == {"non_finite": 1}
    (event,) = results["faults"]["events"]
    assert (event["student"], event["step"]) == ("fragile", 3)
    assert event["action"] == "restored its checkpoint of step 2" and "NaN" in event["cause"]
    logged = read_step_log(run.storage)
    rows = [row for row in logged if row.step == 3]
    assert [row.student for row in rows] == ["steady"]  # the step went on without the refused frame…
    assert rows[0].mimicry_loss == 0.0  # …and the steady student had no peer to mimic at that step
    assert all(torch.isfinite(torch.tensor([row.ce_loss, row.mimicry_loss])).all() for row in logged)
    assert {row.student for row in logged if row.step == 4} == {"fragile", "steady"}  # it trains on afterwards
    final = torch.load(tmp_path / "nan" / checkpoint_directory(6) / "fragile.pt", weights_only=True)
    assert final["optimizer"]["param_groups"][0]["lr"] < 0.05 * 0.5 + 1e-12  # backed off (and cosine-annealed)
