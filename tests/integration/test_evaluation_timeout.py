"""An epoch's scores that never come: the evaluation ``TimeoutError`` goes through the failure policy.

A Ray student that hangs while scoring delays its own ``evaluate`` call, which the driver waits on
first; the realistic trigger is an external student (gRPC) that trains its steps but withholds its
evaluation at an epoch end while keeping its session. The driver then waits
``runtime.ray.exchange_timeout_s`` for the epoch's scores, the coordinator answers with a
``TimeoutError``, and the policy decides: the cohort rolls back (any policy but ``fail``: a timeout
is no student's failure, so ``continue`` rolls back too) or the run stops. Real Ray, a real gRPC
server in the coordinator and a real client in a thread of the test, all on loopback.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.engines.failure_policy import RunFailed
from rdml_dist.engines.ray_engine import train_ray
from rdml_dist.external_student import ExternalResult, ExternalStudent, run_external_student
from rdml_dist.messages import EvalFrame
from rdml_dist.rpc.client import CohortClient
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2
from tests.integration.cli_process import free_port
from tests.integration.conftest import cohort_released, read_json, wait_until
from tests.integration.test_failure_paths import NAMES, STEPS_PER_EPOCH, TOTAL, _assert_as_undisturbed, _config, _events

EXTERNAL = "outside"
STUDENTS = [*NAMES, EXTERNAL]
EVALUATION_TIMEOUT_S = 20.0  # runtime.ray.exchange_timeout_s: it bounds the wait for an epoch's scores too
WITHHELD_EPOCH = 0
LAST_CHECKPOINT = 4  # the latest checkpoint before epoch 0's end (a checkpoint every 2 steps)


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _mixed_config(run_dir: Path, transport: str, **fault: Any) -> ExperimentConfig:
    """The failure-path cohort (Ray students ``a`` and ``b``) with an external student beside them."""
    raw = _config(run_dir, transport, **fault).model_dump(mode="json")
    raw["students"].append({"name": EXTERNAL, "model": "mlp", "external": True})
    raw["rpc"].update(port=free_port(), join_timeout_s=120)
    raw["runtime"]["ray"]["exchange_timeout_s"] = EVALUATION_TIMEOUT_S
    return parse_config(raw)


class WithholdingClient(CohortClient):
    """An external student's client that does not send its scores of ``WITHHELD_EPOCH`` the first time.

    It keeps its session and sends nothing until the cohort has given up on that epoch (the cohort is
    halted, has gone back before the epoch's end, or its coordinator is gone). Then it either goes on, so
    that its next frame is refused and the student follows the rollback (``resumes``), or stops for good.
    """

    def __init__(self, config: ExperimentConfig, resumes: bool) -> None:
        super().__init__(f"127.0.0.1:{config.rpc.port}", config.rpc)
        self.resumes = resumes
        self.withheld: list[int] = []

    def submit_evaluation(self, frame: EvalFrame, session: str) -> bool:
        if frame.epoch != WITHHELD_EPOCH or self.withheld:
            return super().submit_evaluation(frame, session)
        self.withheld.append(frame.epoch)
        epoch_end = (frame.epoch + 1) * STEPS_PER_EPOCH
        wait_until(lambda: self._given_up(epoch_end), f"the cohort gives up on epoch {frame.epoch}'s scores",
                   EVALUATION_TIMEOUT_S + 120)
        if not self.resumes:
            raise StoppedForGood(f"withheld the scores of epoch {frame.epoch}")
        return False

    def _given_up(self, epoch_end: int) -> bool:
        try:
            status = self.status(timeout_s=5)
        except grpc.RpcError:
            return True  # the coordinator is gone: the run is over
        return status.phase == cohort_pb2.COHORT_PHASE_HALTED or status.step < epoch_end


class StoppedForGood(Exception):
    """The withholding student ended without ever sending its scores."""


@contextlib.contextmanager
def _beside_the_driver(student: Callable[[], ExternalResult]) -> Iterator[dict[str, Any]]:
    """Run ``student`` in a thread while the block runs the driver; its result (or error) lands in the dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = student()
        except BaseException as error:  # noqa: BLE001 - the test reads it
            outcome["error"] = error

    threads = torch.get_num_threads()  # the student sets the process's torch threads to its config's
    thread = threading.Thread(target=run, name="external-student", daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(timeout=180)
        torch.set_num_threads(threads)
    assert not thread.is_alive(), "the external student did not end with the run"


def _withholding(config: ExperimentConfig, client: WithholdingClient) -> Callable[[], ExternalResult]:
    def run() -> ExternalResult:
        try:
            return ExternalStudent(config, EXTERNAL, client).run()
        finally:
            client.close()

    return run


_UNDISTURBED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The undisturbed mixed run of each transport (the external student sends every score), trained once."""

    def run(transport: str) -> Path:
        if transport not in _UNDISTURBED:
            run_dir = tmp_path_factory.mktemp(f"undisturbed-external-{transport}")
            config = _mixed_config(run_dir, transport)
            address = f"127.0.0.1:{config.rpc.port}"
            with _beside_the_driver(lambda: run_external_student(config, EXTERNAL, address, None, None)) as outcome:
                train_ray(config, run_dir, show_progress=False).finish()
            assert outcome.get("result") == ExternalResult(EXTERNAL, TOTAL, 2, 0, 0), outcome
            wait_until(cohort_released, "the cohort is released")
            _UNDISTURBED[transport] = run_dir
        return _UNDISTURBED[transport]

    return run


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("policy", "transport"), [("restart_cohort", "tcp"), ("restart_cohort", "actor_calls"),
                                                   ("continue", "tcp")])
def test_scores_an_external_student_withholds_time_out_and_the_cohort_rolls_back(
    undisturbed: Callable[[str], Path], tmp_path: Path, policy: str, transport: str
) -> None:
    config = _mixed_config(tmp_path / "run", transport, on_student_failure=policy)
    client = WithholdingClient(config, resumes=True)
    with _beside_the_driver(_withholding(config, client)) as outcome:
        train_ray(config, tmp_path / "run", show_progress=False).finish()
    wait_until(cohort_released, "the cohort is released")
    assert client.withheld == [WITHHELD_EPOCH]
    result = outcome.get("result")
    assert result is not None and (result.steps, result.rejoins) == (TOTAL, 1), outcome  # it followed the rollback once
    results = read_json(tmp_path / "run" / "results.json")
    assert _events(results) == [("timeout", None, STEPS_PER_EPOCH, f"rolled back to step {LAST_CHECKPOINT}")]
    assert results["faults"]["events"][0]["cause"] == (
        f"TimeoutError: epoch {WITHHELD_EPOCH} was not scored within {EVALUATION_TIMEOUT_S} s (no scores from {EXTERNAL})")
    assert all(entry["students"][EXTERNAL]["val_accuracy"] is not None for entry in results["epochs"])
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport), students=STUDENTS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["tcp", "actor_calls"])
def test_under_fail_scores_that_never_come_stop_the_run_with_the_timeout(
    undisturbed: Callable[[str], Path], tmp_path: Path, transport: str
) -> None:
    config = _mixed_config(tmp_path / "run", transport, on_student_failure="fail")
    client = WithholdingClient(config, resumes=False)
    with _beside_the_driver(_withholding(config, client)) as outcome:
        with pytest.raises(RunFailed, match=(
            rf"^the coordinator timed out at step {STEPS_PER_EPOCH}: TimeoutError: epoch {WITHHELD_EPOCH} was not "
            rf"scored within {EVALUATION_TIMEOUT_S} s \(no scores from {EXTERNAL}\) "
            rf"\(runtime.fault.on_student_failure is 'fail'\)$")):
            train_ray(config, tmp_path / "run", show_progress=False)
    wait_until(cohort_released, "the cohort is released")
    assert client.withheld == [WITHHELD_EPOCH] and isinstance(outcome.get("error"), StoppedForGood), outcome
    results = read_json(tmp_path / "run" / "results.json")
    assert _events(results) == [("timeout", None, STEPS_PER_EPOCH, "the run stopped")]
    # The step log and the checkpoints end at the latest complete checkpoint, each as the undisturbed run's.
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport), students=STUDENTS, until=LAST_CHECKPOINT)
