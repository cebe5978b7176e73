"""The frame lane's wire format over a real socket pair: frames and replies survive it, bad messages are named."""

import json
import math
import socket

import pytest
import torch

from rdml_dist.messages import LogitsFrame, MimicryReply, StepMeasures
from rdml_dist.lane.wire import (
    LaneProtocolError, decode_tensor, encode, frame_from, frame_header, receive_message, reply_from, reply_header, send_message,
)


@pytest.fixture
def pair() -> socket.socket:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_frame_arrives_as_it_was_sent(pair: tuple[socket.socket, socket.socket], dtype: torch.dtype) -> None:
    left, right = pair
    logits = torch.randn(5, 7).to(dtype)
    sent = LogitsFrame("a", 3, "abc123", logits, 1.25, 4, 5, 3, StepMeasures(2, 0.5, 0.25))
    send_message(left, frame_header("exchange", sent), sent.logits)
    header, payload = receive_message(right, 1 << 20)
    received = frame_from("a", header, payload)
    assert header["kind"] == "exchange" and received.logits.dtype == dtype
    assert torch.equal(received.logits, logits)
    assert (received.step, received.batch_hash, received.ce_loss, received.previous) == (3, "abc123", 1.25, StepMeasures(2, 0.5, 0.25))


def test_a_reply_arrives_as_it_was_sent_and_nan_losses_survive(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    reply = MimicryReply(7, torch.randn(4, 3), 0.5, 2.0, 1.0, 3, refresh=True)
    send_message(left, reply_header(reply), reply.grad)
    received = reply_from(*receive_message(right, 1 << 20))
    assert torch.equal(received.grad, reply.grad) and received.refresh and received.live_students == 3
    refresh = LogitsFrame("a", 1, "h", torch.zeros(2, 2), math.nan, 0, 0, 0)
    send_message(left, frame_header("refresh", refresh), refresh.logits)
    assert math.isnan(frame_from("a", *receive_message(right, 1 << 20)).ce_loss)


@pytest.mark.parametrize(
    "header,payload,fragment",
    [
        ({"dtype": "int64", "shape": [2]}, b"\0" * 16, "dtype 'int64' is not one of"),
        ({"dtype": "float32", "shape": [2, 3]}, b"\0" * 7, "needs 24 bytes, got 7"),
        ({"dtype": "float32", "shape": [-1]}, b"", "not a list of sizes"),
        ({"dtype": "float32", "shape": "2"}, b"", "not a list of sizes"),
    ],
)
def test_a_tensor_that_does_not_match_its_header_is_refused(header: dict, payload: bytes, fragment: str) -> None:
    with pytest.raises(LaneProtocolError, match=fragment):
        decode_tensor(header, payload, "logits")


def test_the_header_names_every_field_of_the_frame() -> None:
    """The header is the message vocabulary's fields by name (no positional lists), so either end can evolve them."""
    frame = LogitsFrame("a", 3, "abc123", torch.zeros(1, 2), 1.25, 4, 5, 3, StepMeasures(2, 0.5, 0.25))
    header = frame_header("exchange", frame)
    assert header == {"kind": "exchange", "step": 3, "batch_hash": "abc123", "ce_loss": 1.25, "correct": 4, "labelled": 5,
                      "correct_clean": 3, "previous": {"step": 2, "compute_seconds": 0.5, "round_trip_seconds": 0.25}}
    garbled = {**header, "previous": [2, 0.5, 0.25], "dtype": "float32", "shape": [1, 2]}
    with pytest.raises(LaneProtocolError, match="lacks or garbles a field"):
        frame_from("a", garbled, b"\0" * 8)


def test_a_frame_without_its_fields_is_refused() -> None:
    with pytest.raises(LaneProtocolError, match="lacks or garbles a field"):
        frame_from("a", {"kind": "exchange", "dtype": "float32", "shape": [0]}, b"")


def test_oversized_or_garbled_messages_are_refused_before_reading_them(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    send_message(left, {"kind": "exchange"}, torch.zeros(1024))
    with pytest.raises(LaneProtocolError, match="exceeds the limits"):
        receive_message(right, 1000)  # 4096 payload bytes announced, 1000 allowed
    left2, right2 = socket.socketpair()
    with left2, right2:
        prefix, _ = encode({"x": 1})
        text = b"not json"
        left2.sendall(len(text).to_bytes(4, "big") + (0).to_bytes(8, "big") + text)
        with pytest.raises(LaneProtocolError, match="not JSON"):
            receive_message(right2, 1000)
        assert json.loads(prefix[12:]) == {"x": 1}


def test_a_closed_peer_is_a_connection_error(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.close()
    with pytest.raises(ConnectionError):
        receive_message(right, 1000)
