"""Every failure path goes through the failure policy: one test per path, on both transports.

Each fault is triggered at a chosen call by a test model (:mod:`tests.integration.faulty_models`):
a student that raises, dies or hangs at step N, in ``state_dict``, in evaluation or in restore, or
that kills the coordinator while the cohort is idle between chunks. Nothing waits for a file to
appear and then kills "a few seconds later". Each test asserts what the policy did, that the step
log and ``results.json`` hold every step and epoch exactly once, and that no checkpoint is
mislabelled: every checkpoint of a run the policy rolled back holds exactly the undisturbed run's
weights of its step.
"""

import contextlib
import math
import os
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from rdml_dist.engines.failure_policy import RunFailed
from rdml_dist.engines.failures import CoordinatorReplaced
from rdml_dist.engines import ray_cohort
from rdml_dist.engines.ray_actors import CoordinatorActor
from rdml_dist.engines.ray_engine import train_ray
from rdml_dist.errors import ClusterError, ConfigError
from rdml_dist.lane.handshake import MAX_PENDING_HELLOS, proof
from rdml_dist.lane.wire import receive_message, send_message
from rdml_dist.messages import EvalFrame, StudentInfo
from tests.integration.conftest import cohort_released, make_config, read_json, read_steps, wait_until
from tests.integration.faulty_models import SIMULATED_OOM

TRANSPORTS = ["tcp", "actor_calls"]
NAMES = ["a", "b"]
EPOCHS = 2
STEPS_PER_EPOCH = math.ceil(round(1797 * 0.8) / 256)  # 6
TOTAL = EPOCHS * STEPS_PER_EPOCH
EXCHANGE_TIMEOUT_S = 10.0  # what a hang must outlast; a normal step here takes milliseconds


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _config(run_dir: Path, transport: str, faults: dict[str, list[dict[str, Any]]] | None = None, **fault: Any) -> Any:
    faults = faults or {}
    students = []
    for name in NAMES:
        if name in faults:
            markers = run_dir.parent / f"{run_dir.name}-markers-{name}"
            markers.mkdir(exist_ok=True)
            students.append({"name": name, "model": "tests.integration.faulty_models:mlp_with_faults",
                             "options": {"faults": faults[name], "markers": str(markers), "run_dir": str(run_dir)}})
        else:
            students.append({"name": name, "model": "mlp"})
    return make_config(
        run_dir, students,
        training={"epochs": EPOCHS, "batch_size": 256},
        runtime={"checkpoint": {"every_steps": 2, "keep": 100}, "fault": {"max_failures": 4, **fault},
                 "exchange": {"transport": transport}},
        ray={"exchange_timeout_s": EXCHANGE_TIMEOUT_S},
    )


_UNDISTURBED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The undisturbed run of each transport, trained once when a test first needs it."""

    def run(transport: str) -> Path:
        if transport not in _UNDISTURBED:
            run_dir = tmp_path_factory.mktemp(f"undisturbed-{transport}")
            train_ray(_config(run_dir, transport), run_dir, show_progress=False).finish()
            _UNDISTURBED[transport] = run_dir
        return _UNDISTURBED[transport]

    return run


def _train(run_dir: Path, transport: str, faults: dict[str, list[dict[str, Any]]], **fault: Any) -> dict[str, Any]:
    train_ray(_config(run_dir, transport, faults, **fault), run_dir, show_progress=False).finish()
    wait_until(cohort_released, "the cohort is released")
    return read_json(run_dir / "results.json")


def _events(results: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(event["kind"], event.get("student"), event["step"], event["action"]) for event in results["faults"]["events"]]


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(path.parent.name.removeprefix("step-")): path.parent
            for path in (run_dir / "checkpoints").glob("step-*/manifest.json")}


def _assert_as_undisturbed(run_dir: Path, undisturbed: Path, students: Sequence[str] = NAMES, until: int = TOTAL) -> None:
    """Every step once, every epoch once, the same numbers, and every checkpoint the undisturbed one of its step.

    ``students`` are those in the step log (external ones too; only the Ray students, ``NAMES``, write checkpoints
    into the run); ``until`` is the latest checkpoint of a run the policy stopped: steps, epochs and checkpoints up to it.
    """
    rows = read_steps(run_dir)
    assert sorted((int(row["step"]), row["student"]) for row in rows) == [
        (step, name) for step in range(until) for name in sorted(students)]
    expected = {(row["step"], row["student"]): row for row in read_steps(undisturbed)}
    for row in rows:
        for column in ("ce_loss", "mimicry_loss", "correct"):
            assert row[column] == expected[(row["step"], row["student"])][column], (row["step"], row["student"], column)
    results, reference = read_json(run_dir / "results.json"), read_json(undisturbed / "results.json")
    epochs = until // STEPS_PER_EPOCH
    assert [entry["epoch"] for entry in results["epochs"]] == list(range(epochs))
    assert [entry["ensemble_val_accuracy"] for entry in results["epochs"]] == [
        entry["ensemble_val_accuracy"] for entry in reference["epochs"][:epochs]]
    checkpoints = _checkpoints(run_dir)
    reference_checkpoints = {step: directory for step, directory in _checkpoints(undisturbed).items() if step <= until}
    assert set(checkpoints) == set(reference_checkpoints)
    for step, directory in checkpoints.items():
        assert read_json(directory / "manifest.json")["step"] == step
        for name in NAMES:
            mine = torch.load(directory / f"{name}.pt", weights_only=True)["model"]
            theirs = torch.load(reference_checkpoints[step] / f"{name}.pt", weights_only=True)["model"]
            assert mine.keys() == theirs.keys() or {key.removeprefix("inner.") for key in mine} == set(theirs)
            for key, tensor in theirs.items():
                assert torch.equal(mine.get(key, mine.get(f"inner.{key}")), tensor), (step, name, key)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_students_own_exception_goes_to_the_policy_and_names_the_failing_step(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    results = _train(tmp_path / "run", transport, {"a": [{"how": "raise", "where": "step", "after": 3}]})
    assert _events(results) == [("student_error", "a", 3, "rolled back to step 2")]
    assert SIMULATED_OOM in results["faults"]["events"][0]["cause"]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_non_finite_recovery_in_a_chunk_that_is_then_rolled_back_stays_in_the_runs_faults(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    # a's step-2 logits are NaN (it goes back to its step-2 checkpoint); b dies at step 3, in the same chunk
    results = _train(tmp_path / "run", transport, {"a": [{"how": "non_finite", "where": "step", "after": 2}],
                                                    "b": [{"how": "exit", "where": "step", "after": 3}]})
    events = _events(results)
    assert ("non_finite", "a", 2, "restored its checkpoint of step 2") in events, events
    assert ("student_died", "b", 3, "rolled back to step 2") in events, events
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_death_during_restore_rolls_back_again(undisturbed: Any, tmp_path: Path, transport: str) -> None:
    faults = {"a": [{"how": "exit", "where": "step", "after": 3}, {"how": "exit", "where": "restore"}]}
    results = _train(tmp_path / "run", transport, faults)
    assert _events(results) == [("student_died", "a", 3, "rolled back to step 2"), ("student_died", "a", 2, "rolled back to step 2")]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_second_death_while_the_cohort_rolls_back_is_handled_too(undisturbed: Any, tmp_path: Path, transport: str) -> None:
    faults = {"a": [{"how": "raise", "where": "step", "after": 3}], "b": [{"how": "exit", "where": "restore"}]}
    results = _train(tmp_path / "run", transport, faults)
    assert _events(results) == [("student_error", "a", 3, "rolled back to step 2"), ("student_died", "b", 2, "rolled back to step 2")]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_death_while_rejoining_under_continue_is_retried(tmp_path: Path, transport: str) -> None:
    faults = {"a": [{"how": "exit", "where": "step", "after": 3}, {"how": "exit", "where": "restore"}]}
    results = _train(tmp_path / "run", transport, faults, on_student_failure="continue")
    assert _events(results) == [("student_died", "a", 3, "the live students went on"),
                                ("student_died", "a", 4, "the live students went on; it rejoins again")]
    rows = read_steps(tmp_path / "run")
    assert sorted(int(row["step"]) for row in rows if row["student"] == "b") == list(range(TOTAL))  # b never stopped
    assert sorted(int(row["step"]) for row in rows if row["student"] == "a") == [step for step in range(TOTAL) if step != 3]
    assert [entry["epoch"] for entry in results["epochs"]] == list(range(EPOCHS))
    assert all(entry["students"]["a"]["val_accuracy"] is not None for entry in results["epochs"])  # a rejoined


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_exchange_timeout_goes_to_the_policy(undisturbed: Any, tmp_path: Path, transport: str) -> None:
    # a's hang outlasts b's exchange timeout, and ends well within the rollback's wait for the calls under way
    faults = {"a": [{"how": "hang", "where": "step", "after": 3, "seconds": EXCHANGE_TIMEOUT_S + 3}]}
    results = _train(tmp_path / "run", transport, faults)
    assert _events(results) == [("timeout", "b", 3, "rolled back to step 2")]  # b waited for a at the barrier
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_that_hangs_outside_the_steps_is_bounded_and_goes_to_the_policy(
    undisturbed: Any, tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A student stuck writing its checkpoint of step 4: no exchange times out there, the driver's own bound does.
    Its call outlives the rollback's abort too, so it is killed, restarted by Ray and restored with the cohort
    (a hung process would hold every later call to it, the restore's included).

    The bound is the exchange timeout plus a margin of a minute; a shorter margin keeps the test short.
    """
    monkeypatch.setattr(ray_cohort, "STALL_MARGIN_S", 3.0)
    faults = {"a": [{"how": "hang", "where": "state_dict", "after": 4, "seconds": 600}]}
    results = _train(tmp_path / "run", transport, faults)
    assert _events(results) == [("timeout", "a", 4, "killed (its call hung past the abort); restored with the cohort"),
                                ("timeout", "a", 4, "rolled back to step 2")]
    assert f"within {EXCHANGE_TIMEOUT_S + 3.0:.0f} s" in results["faults"]["events"][0]["cause"]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_death_in_the_step_0_checkpoint_starts_the_cohort_again(undisturbed: Any, tmp_path: Path, transport: str) -> None:
    results = _train(tmp_path / "run", transport, {"a": [{"how": "exit", "where": "state_dict"}]})
    assert _events(results) == [("student_died", "a", 0, "rolled back to the initial state")]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_coordinator_killed_while_idle_between_chunks_is_a_coordinator_failure(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    """Killed while the students score epoch 0: the calls that follow reach a fresh process, which refuses them."""
    faults = {"a": [{"how": "kill_coordinator", "where": "evaluation", "after": STEPS_PER_EPOCH}]}
    results = _train(tmp_path / "run", transport, faults)
    assert _events(results) == [("coordinator_died", None, STEPS_PER_EPOCH, "rolled back to step 4")]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_student_lost_under_continue_while_the_coordinator_dies_rolls_back(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    """mark_dead on a dead coordinator is a coordinator failure; the student's death is reported too."""
    faults = {"a": [{"how": "kill_coordinator_and_exit", "where": "step", "after": 3}]}
    results = _train(tmp_path / "run", transport, faults, on_student_failure="continue")
    kinds = {(event["kind"], event.get("student")) for event in results["faults"]["events"]}
    assert kinds == {("coordinator_died", None), ("student_died", "a")}, results["faults"]["events"]
    assert results["faults"]["events"][-1]["action"] == "rolled back to step 2"
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_students_lost_in_one_evaluation_under_continue_are_counted_once_each(tmp_path: Path, transport: str) -> None:
    """As a node loss would: both die in their epoch-0 evaluation. The first one's rejoin finds the second already
    replaced by Ray, whose own failing call reports it: counted there alone, so a budget of two failures holds."""
    faults = {name: [{"how": "exit", "where": "evaluation"}] for name in NAMES}
    results = _train(tmp_path / "run", transport, faults, on_student_failure="continue", max_failures=2)
    deaths = sorted(student for kind, student, _, _ in _events(results) if kind == "student_died")
    assert deaths == NAMES, results["faults"]["events"]
    assert [entry["epoch"] for entry in results["epochs"]] == list(range(EPOCHS))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_losing_every_live_student_under_continue_rolls_back_instead_of_a_mislabelled_checkpoint(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    faults = {name: [{"how": "exit", "where": "step", "after": 3}] for name in NAMES}
    results = _train(tmp_path / "run", transport, faults, on_student_failure="continue")
    events = _events(results)
    assert sorted(event[1] for event in events) == NAMES and {event[2] for event in events} == {3}
    assert [event[3] for event in events] == ["the live students went on", "rolled back to step 2"]
    _assert_as_undisturbed(tmp_path / "run", undisturbed(transport))  # every checkpoint holds its own step's weights


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_under_fail_the_report_names_the_failing_step(tmp_path: Path, transport: str) -> None:
    with pytest.raises(RunFailed, match=r"student 'a' on node \w+ died at step 3: ActorDiedError"):
        _train(tmp_path / "run", transport, {"a": [{"how": "exit", "where": "step", "after": 3}]}, on_student_failure="fail")
    wait_until(cohort_released, "the cohort is released")
    results = read_json(tmp_path / "run" / "results.json")  # a failed run's results list the fault that stopped it
    assert _events(results) == [("student_died", "a", 3, "the run stopped")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_model_factory_that_fails_ends_the_run_with_one_line_and_leaves_nothing_behind(tmp_path: Path, transport: str) -> None:
    config = make_config(tmp_path, [{"name": "a", "model": "tests.integration.faulty_models:failing_factory"},
                                    {"name": "b", "model": "mlp"}],
                         runtime={"exchange": {"transport": transport}})
    with pytest.raises(ConfigError) as error:
        train_ray(config, tmp_path, show_progress=False)
    assert str(error.value) == ("students.0: student 'a' could not be built: RuntimeError: the model factory failed: "
                                "simulated bug in the user's code")
    wait_until(cohort_released, "the placement group and the actors are released")


def _lane_host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _refused_and_closed(address: str, hello: dict[str, Any] | None = None, junk: bytes = b"") -> list[dict[str, Any]]:
    """What the lane at ``address`` answers a stranger (its challenge, then to ``hello``, whose proof comes from a key
    of the stranger's own, or to ``junk``) before it closes the connection; fails if it keeps it open."""
    answers: list[dict[str, Any]] = []
    with socket.create_connection(_lane_host_port(address), timeout=5.0) as stranger:
        answers.append(receive_message(stranger, 0)[0])
        assert "challenge" in answers[0], answers
        if hello is not None:
            send_message(stranger, {**hello, "proof": proof("a key of its own", answers[0]["challenge"], hello["student"])})
        stranger.sendall(junk)
        with contextlib.suppress(ConnectionError, ValueError):  # the end of the stream, or a cut message
            while True:
                answers.append(receive_message(stranger, 1 << 20)[0])  # a server that keeps it open times out here
    return answers


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["tcp"])
def test_strangers_at_the_frame_lane_of_a_live_run_are_turned_away_and_change_nothing(
    undisturbed: Any, tmp_path: Path, transport: str
) -> None:
    """While a holds the cohort in its checkpoint of step 2 (no exchange waits then), strangers reach the run's frame
    lane: proofs from keys of their own in a student's name and in a stranger's, more connections that never say hello
    than the lane holds, and junk. Each is refused or closed, and the run ends as the undisturbed one, faults none."""
    released, run_dir = tmp_path / "released", tmp_path / "run"
    faults = {"a": [{"how": "wait_for", "where": "state_dict", "after": 2, "path": str(released), "seconds": 50}]}
    error: list[BaseException] = []

    def train() -> None:
        try:
            _train(run_dir, transport, faults)
        except BaseException as failure:  # noqa: BLE001 - handed to the test
            error.append(failure)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        wait_until(lambda: (tmp_path / "run-markers-a" / "fault-0").exists() or not thread.is_alive(), "a holds the cohort", 120)
        assert not error, error
        (address,) = [read_json(run_dir / "placements.json")["coordinator"]["lane"]]
        for name in ("a", "mallory"):
            answers = _refused_and_closed(address, hello={"student": name})
            assert [answer.get("reason") for answer in answers[1:]] == ["unauthenticated"], answers
        for junk in (b"\0" * 12, b"\0\0\0\x05" + b"\0" * 8 + b"hello", (1 << 30).to_bytes(4, "big") + b"\0" * 8, bytes(range(200))):
            answers = _refused_and_closed(address, junk=junk)
            assert all(answer.get("ok") is not True for answer in answers[1:]), answers
        with contextlib.ExitStack() as held:
            silent = [held.enter_context(socket.create_connection(_lane_host_port(address), timeout=5.0))
                      for _ in range(MAX_PENDING_HELLOS)]
            for connection in silent:
                assert "challenge" in receive_message(connection, 0)[0]
            with socket.create_connection(_lane_host_port(address), timeout=5.0) as one_more:  # closed unheard
                assert one_more.recv(1 << 16) == b""
    finally:
        released.touch()
        thread.join(240)
    assert not thread.is_alive() and not error, error
    assert read_json(run_dir / "results.json")["faults"]["events"] == []
    _assert_as_undisturbed(run_dir, undisturbed(transport))


@pytest.mark.timeout(300)
def test_a_student_whose_start_hangs_ends_the_run_naming_it_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """``runtime.ray.start_timeout_s`` bounds the cohort's start (long enough here for a's start under any load)."""
    config = make_config(tmp_path, [{"name": "a", "model": "mlp"},
                                    {"name": "b", "model": "tests.integration.faulty_models:hanging_factory",
                                     "options": {"seconds": 600}}],
                         ray={"start_timeout_s": 30})
    with pytest.raises(ClusterError, match=r"^student\(s\) b did not start within 30 s \(runtime.ray.start_timeout_s\)$"):
        train_ray(config, tmp_path, show_progress=False)
    wait_until(cohort_released, "the placement group and the actors are released")


def _refusal(reference: Any) -> BaseException:
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(reference, timeout=60)
    return refused.value.cause


def _pid_or_none(coordinator: Any) -> int | None:
    try:
        return ray.get(coordinator.state.remote(), timeout=10)["pid"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


@pytest.mark.timeout(180)
def test_control_calls_to_a_restarted_coordinator_are_refused_not_answered_from_an_empty_core(tmp_path: Path) -> None:
    """pop_records must not return [] and submit_eval must not say "not a live member": the process changed."""
    config = _config(tmp_path, "actor_calls")
    coordinator = CoordinatorActor.options(max_restarts=-1, num_cpus=0).remote(config.model_dump(mode="json"))
    infos = [StudentInfo(name, 20, 4, 3, steps_per_epoch=3) for name in NAMES]
    try:
        ray.get([coordinator.register.remote(info) for info in infos])
        first = ray.get(coordinator.state.remote())
        assert ray.get(coordinator.pop_records.remote(0, first["incarnation"])) == []
        os.kill(first["pid"], signal.SIGKILL)
        wait_until(lambda: _pid_or_none(coordinator) not in (None, first["pid"]), "Ray restarts the coordinator", 90)
        stale = first["incarnation"]
        scores = EvalFrame("a", 0, torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 1]))
        for call in (coordinator.pop_records.remote(3, stale), coordinator.submit_eval.remote(scores, stale),
                     coordinator.mark_dead.remote("a", stale), coordinator.step_after.remote(0, stale),
                     coordinator.evaluation.remote(0, 5.0, stale)):
            cause = _refusal(call)
            assert isinstance(cause, CoordinatorReplaced) and "lost the cohort's state" in str(cause), cause
        fresh = ray.get(coordinator.restore.remote(0, infos))  # the driver restores it and adopts the new process
        assert fresh != stale and ray.get(coordinator.pop_records.remote(0, fresh)) == []
    finally:
        ray.kill(coordinator, no_restart=True)
