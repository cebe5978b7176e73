"""The frame lane over real loopback sockets around a real barrier, as inside the coordinator actor.

The barrier and its lane server run on a private event loop thread; the students are real
:class:`FrameLaneClient` connections sending hand-made frames, so each refusal can be provoked.
"""

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.divergence import mimicry_gradients
from rdml_dist.errors import CohortStepFailed, CoordinatorUnreachable, FrameRejected
from rdml_dist.lane import server as lane_server
from rdml_dist.lane.client import FrameLaneClient
from rdml_dist.lane.handshake import proof, student_key
from rdml_dist.lane.server import FrameLaneServer
from rdml_dist.lane.wire import receive_message, send_message
from tests.integration.conftest import wait_until
from tests.integration.test_cohort_service import BATCH, SEED, TIMEOUT, frame, info, logits_for

SECRET = "run-secret"
NAMES = ["a", "b", "c"]


def lane_config() -> ExperimentConfig:
    return parse_config({
        "name": "lane", "seed": SEED, "students": [{"name": name, "model": "mlp"} for name in NAMES],
        "training": {"batch_size": BATCH, "epochs": 2},
        "mimicry": {"alpha": 2.0, "temperature": 2.0, "weight": 0.5},
        "runtime": {"ray": {"exchange_timeout_s": TIMEOUT}},
    })


class RunningLane:
    """A barrier with every student registered, its lane server, and one connected client per student."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.barrier = CohortBarrier(lane_config())
        for name in NAMES:
            self.barrier.register(info(name))
        self.server = FrameLaneServer(self.barrier, SECRET, 1 << 20)
        self.address = self.call(self.server.start("127.0.0.1"))
        self.clients = {name: self.connect(name) for name in NAMES}
        self.pool = ThreadPoolExecutor(max_workers=len(NAMES))

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    async def _release_waiting(self) -> None:
        """Fail any frame still at the barrier, so that no connection handler outlives the loop."""
        self.barrier.abort("the test is over")
        await asyncio.sleep(0.05)

    def connect(self, name: str, key: str | None = None) -> FrameLaneClient:
        return FrameLaneClient(self.address, key or student_key(SECRET, name), name, TIMEOUT, 1 << 20)

    def raw(self) -> socket.socket:
        """A plain TCP connection to the lane, as a stranger would open it."""
        host, port = self.address.rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=TIMEOUT)

    def send(self, name: str, step: int, logits: torch.Tensor) -> Any:
        return self.pool.submit(self.clients[name].exchange, frame(name, step, logits))

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.pool.shutdown()
        self.call(self.server.stop())
        self.call(self._release_waiting())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def lane() -> Iterator[RunningLane]:
    running = RunningLane()
    yield running
    running.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replies_are_the_in_process_mimicry_gradients(lane: RunningLane, dtype: torch.dtype) -> None:
    logits = {name: logits_for(seed).to(dtype) for seed, name in enumerate(NAMES)}
    pending = {name: lane.send(name, 0, logits[name]) for name in NAMES}
    replies = {name: future.result(TIMEOUT) for name, future in pending.items()}
    expected = mimicry_gradients(torch.stack([logits[name].float() for name in NAMES]), alpha=2.0, temperature=2.0)
    for position, name in enumerate(NAMES):
        assert replies[name].step == 0 and replies[name].live_students == 3 and replies[name].grad.dtype == dtype
        torch.testing.assert_close(replies[name].grad, (expected.grads[position] * 2.0).to(dtype), rtol=1e-6, atol=1e-7)
        assert replies[name].mimicry_loss == pytest.approx(float(expected.losses[position]) * 2.0, rel=1e-6)


def test_a_non_finite_frame_is_refused_as_such_and_the_others_go_on(lane: RunningLane) -> None:
    waiting = [lane.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (2, "c"))]
    with pytest.raises(FrameRejected) as refused:
        lane.clients["b"].exchange(frame("b", 0, torch.full((BATCH, 4), float("nan"))))
    assert refused.value.reason == "non_finite"
    assert [future.result(TIMEOUT).live_students for future in waiting] == [2, 2]
    replies = [lane.send(name, 1, logits_for(seed)) for seed, name in enumerate(NAMES)]  # b takes part again
    assert [future.result(TIMEOUT).live_students for future in replies] == [3, 3, 3]


def test_a_wrong_step_and_a_wrong_shape_are_refused_with_their_reasons(lane: RunningLane) -> None:
    with pytest.raises(FrameRejected) as ahead:
        lane.clients["a"].exchange(frame("a", 1, logits_for(0)))
    assert ahead.value.reason == "wrong_step"
    waiting = [lane.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (2, "c"))]
    with pytest.raises(FrameRejected) as shaped:
        lane.clients["b"].exchange(frame("b", 0, torch.zeros(BATCH, 5)))
    assert shaped.value.reason == "wrong_shape"
    assert [future.result(TIMEOUT).live_students for future in waiting] == [2, 2]


def test_an_abort_fails_every_waiting_student_at_once(lane: RunningLane) -> None:
    waiting = [lane.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (1, "b"))]
    lane.loop.call_soon_threadsafe(lane.barrier.abort, "student c died")
    for future in waiting:
        with pytest.raises(CohortStepFailed, match="student c died"):
            future.result(TIMEOUT)
    with pytest.raises(CohortStepFailed):  # and new frames are refused until the cohort is restored
        lane.clients["c"].exchange(frame("c", 0, logits_for(2)))


def test_a_wrong_key_and_another_students_key_are_turned_away(lane: RunningLane) -> None:
    with pytest.raises(CoordinatorUnreachable, match="refused the frame lane: no valid proof of the student's lane key"):
        lane.connect("a", key="guess")
    with pytest.raises(CoordinatorUnreachable, match="no valid proof"):  # b's key cannot speak for a
        lane.connect("a", key=student_key(SECRET, "b"))
    with pytest.raises(CoordinatorUnreachable, match="no valid proof"):  # nor the run's secret itself
        lane.connect("a", key=SECRET)


def test_no_secret_crosses_the_wire_and_a_recorded_hello_cannot_be_replayed(lane: RunningLane) -> None:
    key = student_key(SECRET, "a")
    with lane.raw() as first:
        challenge = receive_message(first, 0)[0]["challenge"]
        hello = {"student": "a", "proof": proof(key, challenge, "a")}
        assert SECRET not in str(hello) and key not in str(hello)
        send_message(first, hello)
        assert receive_message(first, 0)[0] == {"ok": True}
    with lane.raw() as replay:
        assert receive_message(replay, 0)[0]["challenge"] != challenge
        send_message(replay, hello)  # the same proof, for another challenge
        answer = receive_message(replay, 0)[0]
        assert answer["ok"] is False and answer["reason"] == "unauthenticated"


def _closed_by_the_server(connection: socket.socket) -> bool:
    try:
        while connection.recv(1 << 16):
            pass  # the challenge, if one came
    except TimeoutError:
        return False
    return True


def test_silent_connections_are_closed_after_the_hello_deadline_and_bounded_in_number(
    lane: RunningLane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane_server, "HELLO_TIMEOUT_S", 1.0)
    monkeypatch.setattr(lane_server, "MAX_PENDING_HELLOS", 4)
    silent = [lane.raw() for _ in range(4)]
    wait_until(lambda: lane.server._pending_hellos == 4, "the four silent connections wait for their hello")
    with lane.raw() as fifth:  # one more than the bound: closed unheard
        fifth.settimeout(0.5)
        assert _closed_by_the_server(fifth)
    replies = [lane.send(name, 0, logits_for(seed)) for seed, name in enumerate(NAMES)]  # the cohort goes on meanwhile
    assert [future.result(TIMEOUT).live_students for future in replies] == [3, 3, 3]
    started = time.monotonic()
    for connection in silent:
        connection.settimeout(5.0)
        assert _closed_by_the_server(connection)
        connection.close()
    assert time.monotonic() - started < 5.0 and lane.server._pending_hellos == 0
    lane.connect("a").close()  # a student proving itself is served again


def test_a_stopped_coordinator_breaks_the_lane_with_coordinator_unreachable(lane: RunningLane) -> None:
    waiting = lane.send("a", 0, logits_for(0))
    wait_until(lambda: "a" not in lane.barrier.core.waiting_for(), "a's frame is at the barrier")
    lane.call(lane.server.stop())
    with pytest.raises(CoordinatorUnreachable, match="broke"):
        waiting.result(TIMEOUT)
    lane.clients["b"].close()
    with pytest.raises(CoordinatorUnreachable, match="cannot open the frame lane"):
        FrameLaneClient("127.0.0.1:1", student_key(SECRET, "b"), "b", TIMEOUT, 1 << 20)


def _fuzzed_messages(rng: random.Random) -> list[bytes]:
    """Malformed and hostile messages: random bytes, sizes past the limits, headers that are no JSON object, frames whose
    fields, dtypes, shapes and payloads lie. Each is one complete write."""
    good = frame("c", 0, logits_for(2))
    fields = {"kind": "exchange", "step": good.step, "batch_hash": good.batch_hash, "ce_loss": 1.0, "correct": 1,
              "labelled": BATCH, "correct_clean": 1, "previous": None}

    def message(header: Any, payload: bytes = b"", declared: int | None = None) -> bytes:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        size = len(payload) if declared is None else declared
        return len(text).to_bytes(4, "big") + size.to_bytes(8, "big") + text + payload

    payload = logits_for(2).numpy().tobytes()
    tensor = {"dtype": "float32", "shape": [BATCH, 4]}
    messages = [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
        (1 << 31).to_bytes(4, "big") + (0).to_bytes(8, "big"),  # a header past the limit
        (2).to_bytes(4, "big") + (1 << 40).to_bytes(8, "big") + b"{}",  # a payload past the limit
        message(b"\xff\xfe not json"),
        message([1, 2, 3]),
        message("just a string"),
        message({**fields, **tensor, "dtype": "int64"}, payload),
        message({**fields, **tensor, "dtype": "complex64"}, payload),
        message({**fields, **tensor, "dtype": "no-such-dtype"}, payload),
        message({**fields, **tensor, "shape": [-1, 4]}, payload),
        message({**fields, **tensor, "shape": [BATCH, 4, 2]}, payload),
        message({**fields, **tensor, "shape": "128x4"}, payload),
        message({**fields, **tensor}, payload[:-4]),  # fewer bytes than the shape needs
        message({**fields, **tensor, "step": "zero"}, payload),
        message({**fields, **tensor, "step": None}, payload),
        message({**fields, **tensor, "step": -7}, payload),
        message({**fields, **tensor, "batch_hash": 12}, payload),
        message({**fields, **tensor, "ce_loss": "NaN"}, payload),
        message({**fields, **tensor, "labelled": -1}, payload),
        message({**{key: value for key, value in fields.items() if key != "step"}, **tensor}, payload),
        message({**fields, **tensor, "previous": {"step": "x"}}, payload),
        message({**fields, **tensor, "kind": "refresh"}, payload),
        message({**fields, **tensor, "kind": "no-such-kind", "student": "a"}, payload),
        message({**fields, **tensor}, payload + b"\0" * 8, declared=len(payload) + 8),
    ]
    return messages + [bytes(rng.randrange(256) for _ in range(rng.randrange(12, 200))) for _ in range(20)]


def _answers(connection: socket.socket) -> list[dict[str, Any]]:
    """Whatever the server answered before it closed the connection or went quiet."""
    answers = []
    connection.settimeout(0.5)
    with contextlib.suppress(ConnectionError, TimeoutError, OSError):
        while True:
            answers.append(receive_message(connection, 1 << 20)[0])
    return answers


def test_fuzzed_messages_from_strangers_and_from_a_proven_student_are_refused_and_the_cohort_goes_on(lane: RunningLane) -> None:
    unhandled: list[dict[str, Any]] = []
    lane.loop.call_soon_threadsafe(lane.loop.set_exception_handler, lambda loop, context: unhandled.append(context))
    rng = random.Random(7)
    for junk in _fuzzed_messages(rng):
        with lane.raw() as stranger:  # before any proof: only the challenge, then the door
            stranger.sendall(junk)
            answers = _answers(stranger)
        assert "challenge" in answers[0] and all(answer.get("ok") is not True for answer in answers[1:]), answers
        with lane.raw() as student:  # c proves itself on a connection of its own, then sends the junk in its name
            challenge = receive_message(student, 0)[0]["challenge"]
            send_message(student, {"student": "c", "proof": proof(student_key(SECRET, "c"), challenge, "c")})
            assert receive_message(student, 0)[0] == {"ok": True}
            student.sendall(junk)
            answers = _answers(student)
        assert all(answer.get("ok") is False for answer in answers), answers  # refused, never answered with a gradient
    for step in (0, 1):  # the cohort still steps, all three taking part
        replies = [lane.send(name, step, logits_for(seed)) for seed, name in enumerate(NAMES)]
        results = []
        for future in replies:
            with contextlib.suppress(FrameRejected):  # c's step-0 frame may be refused: its name sent junk at step 0
                results.append(future.result(TIMEOUT))
        assert results and all(reply.step == step for reply in results)
    assert [reply.live_students for reply in results] == [3, 3, 3]
    assert not unhandled, unhandled
