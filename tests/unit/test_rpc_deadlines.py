"""An external student never waits forever on a coordinator that stopped answering (its node vanished, or froze).

The coordinator here is a real listening socket that accepts connections and never speaks: what a student
sees of a node that went away without a reset.
"""

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from rdml_dist.config import RpcConfig
from rdml_dist.messages import EvalFrame, StudentInfo
from rdml_dist.rpc.client import CohortClient

DEADLINE_S = 1.0


@pytest.fixture
def silent_coordinator() -> Iterator[str]:
    """``host:port`` of a listener that accepts every connection and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.mark.timeout(60)
def test_each_unary_call_of_a_student_ends_at_its_deadline(silent_coordinator: str) -> None:
    client = CohortClient(silent_coordinator, RpcConfig(), token="t", call_deadline_s=DEADLINE_S)
    calls = {
        "join": lambda: client.join(StudentInfo("a", 8, 4, 2, steps_per_epoch=1), "s"),
        "submit_evaluation": lambda: client.submit_evaluation(EvalFrame("a", 0, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), "s"),
        "leave": lambda: client.leave("a", "s", "done"),
    }
    try:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name
            assert time.monotonic() - started < DEADLINE_S + 5, name
    finally:
        client.close()

