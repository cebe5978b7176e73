"""The frame lane's messages: a length-prefixed JSON header, then the raw bytes of at most one tensor.

One message is the header's length (4 bytes) and the payload's (8 bytes), big-endian, the UTF-8
JSON header, and the payload: the tensor as little-endian C-order bytes, its dtype and shape in the header. Nothing a
peer sends is unpickled or executed; every size is checked before anything is allocated.
"""

import asyncio
import json
import socket
from typing import Any

import torch

from rdml_dist.messages import WIRE_DTYPES, LogitsFrame, MimicryReply, from_fields, scalar_fields, torch_dtype, wire_dtype
from rdml_dist.rpc.tensors import WireFormatError, little_endian_bytes, tensor_from_bytes

PREFIX_BYTES = 12
MAX_HEADER_BYTES = 1 << 16
LANE_DTYPES = [name for name, dtype in WIRE_DTYPES.items() if dtype.floating]  # logits and gradients only


class LaneProtocolError(ValueError):
    """A message that breaks the format (sizes, header, dtype, shape): the connection is not usable."""


def encode(header: dict[str, Any], tensor: torch.Tensor | None = None) -> list[bytes | memoryview]:
    """The parts of one message, the tensor's bytes without a copy when it is already contiguous on the CPU."""
    payload: bytes | memoryview = b""
    if tensor is not None:
        dtype = wire_dtype(tensor.dtype)
        if dtype is None or not dtype.floating:
            raise LaneProtocolError(f"a {tensor.dtype} tensor cannot travel on the frame lane (allowed: {', '.join(LANE_DTYPES)})")
        header = {**header, "dtype": dtype.name, "shape": list(tensor.shape)}
        payload = memoryview(little_endian_bytes(tensor).numpy()) if tensor.numel() else b""
    text = json.dumps(header, separators=(",", ":")).encode()
    return [_prefix(len(text), len(payload)) + text, payload]


def _prefix(header_bytes: int, payload_bytes: int) -> bytes:
    return header_bytes.to_bytes(4, "big") + payload_bytes.to_bytes(8, "big")


def _sizes(prefix: bytes, max_payload_bytes: int) -> tuple[int, int]:
    header_bytes, payload_bytes = int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:], "big")
    if header_bytes > MAX_HEADER_BYTES or payload_bytes > max_payload_bytes:
        raise LaneProtocolError(f"a message of {header_bytes} header and {payload_bytes} payload bytes exceeds the limits "
                                f"({MAX_HEADER_BYTES} and {max_payload_bytes})")
    return header_bytes, payload_bytes


def _header(text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LaneProtocolError(f"the message header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise LaneProtocolError("the message header is not a JSON object")
    return header


async def read_message(reader: asyncio.StreamReader, max_payload_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The next message from an asyncio stream (``IncompleteReadError`` at a clean end of the stream)."""
    header_bytes, payload_bytes = _sizes(await reader.readexactly(PREFIX_BYTES), max_payload_bytes)
    header = _header(await reader.readexactly(header_bytes))
    return header, await reader.readexactly(payload_bytes)


def receive_message(connection: socket.socket, max_payload_bytes: int) -> tuple[dict[str, Any], bytearray]:
    """The next message from a blocking socket; ``ConnectionError`` when the peer closed it."""
    header_bytes, payload_bytes = _sizes(bytes(_receive_exactly(connection, PREFIX_BYTES)), max_payload_bytes)
    header = _header(bytes(_receive_exactly(connection, header_bytes)))
    return header, _receive_exactly(connection, payload_bytes)


def _receive_exactly(connection: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = connection.recv_into(view[received:])
        if count == 0:
            raise ConnectionError("the coordinator closed the frame lane")
        received += count
    return buffer


def send_message(connection: socket.socket, header: dict[str, Any], tensor: torch.Tensor | None = None) -> None:
    for part in encode(header, tensor):
        if len(part):
            connection.sendall(part)


def decode_tensor(header: dict[str, Any], payload: bytes | bytearray, what: str) -> torch.Tensor:
    """The tensor a message carries, checked against its header (``LaneProtocolError`` names the problem)."""
    name = str(header.get("dtype"))
    shape = header.get("shape")
    if name not in LANE_DTYPES:
        raise LaneProtocolError(f"{what}: dtype {header.get('dtype')!r} is not one of {', '.join(LANE_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise LaneProtocolError(f"{what}: shape {shape!r} is not a list of sizes")
    try:
        return tensor_from_bytes(payload, torch_dtype(WIRE_DTYPES[name]), shape, what)
    except WireFormatError as error:
        raise LaneProtocolError(str(error)) from None


def frame_header(kind: str, frame: LogitsFrame) -> dict[str, Any]:
    """The header of an ``exchange`` or ``refresh`` request: the frame's fields by name; the logits are its payload."""
    return {"kind": kind, **scalar_fields(frame, leave_out=("student",))}


def frame_from(student: str, header: dict[str, Any], payload: bytes | bytearray) -> LogitsFrame:
    """The frame a request carries for ``student`` (the one the connection authenticated as)."""
    try:
        logits = decode_tensor(header, payload, f"logits from {student!r}")
        return from_fields(LogitsFrame, header, student=student, logits=logits)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, LaneProtocolError):
            raise
        raise LaneProtocolError(f"a frame from {student!r} lacks or garbles a field ({type(error).__name__}: {error})") from None


def reply_header(reply: MimicryReply) -> dict[str, Any]:
    """The header of a successful answer: the reply's fields by name; the gradient is its payload."""
    return {"ok": True, **scalar_fields(reply)}


def reply_from(header: dict[str, Any], payload: bytes | bytearray) -> MimicryReply:
    return from_fields(MimicryReply, header, grad=decode_tensor(header, payload, "gradient"))
