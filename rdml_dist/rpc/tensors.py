"""Tensors on the wire: ``{dtype, shape, raw little-endian C-order bytes}``, never repeated floats.

Decoding checks everything a remote sender controls (a known dtype, non-negative dimensions, a
byte count that matches the shape) and raises :class:`WireFormatError` naming the problem; the
server answers that with INVALID_ARGUMENT.
"""

import math
import sys

import torch

from rdml_dist.messages import WIRE_DTYPES, torch_dtype
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2

PROTO_DTYPES: dict[int, torch.dtype] = {  # rdml.v1.TensorDtype codes of the message vocabulary's wire dtypes
    cohort_pb2.TensorDtype.Value(dtype.proto): torch_dtype(dtype) for dtype in WIRE_DTYPES.values()
}
DTYPE_CODES = {dtype: code for code, dtype in PROTO_DTYPES.items()}
FLOATING_CODES = frozenset(code for code, dtype in PROTO_DTYPES.items() if dtype.is_floating_point)
LITTLE_ENDIAN_HOST = sys.byteorder == "little"


class WireFormatError(ValueError):
    """A tensor message that cannot be decoded (unknown dtype, bad shape, wrong byte count)."""


def encode_tensor(tensor: torch.Tensor) -> cohort_pb2.Tensor:
    """A CPU copy of ``tensor`` as raw little-endian C-order bytes."""
    if tensor.dtype not in DTYPE_CODES:
        raise WireFormatError(f"dtype {tensor.dtype} cannot travel on the wire (allowed: {_allowed()})")
    raw = little_endian_bytes(tensor)
    return cohort_pb2.Tensor(dtype=DTYPE_CODES[tensor.dtype], shape=list(tensor.shape), data=raw.numpy().tobytes())


def decode_tensor(message: cohort_pb2.Tensor, what: str, floating: bool = True) -> torch.Tensor:
    """The tensor ``message`` holds; ``what`` names it in errors; ``floating`` refuses integer dtypes."""
    if message.dtype not in PROTO_DTYPES:
        raise WireFormatError(f"{what}: dtype {_dtype_name(message.dtype)} is not allowed (allowed: {_allowed()})")
    if floating and message.dtype not in FLOATING_CODES:
        raise WireFormatError(f"{what}: dtype {cohort_pb2.TensorDtype.Name(message.dtype)} is not a floating-point type")
    return tensor_from_bytes(message.data, PROTO_DTYPES[message.dtype], list(message.shape), what)


def little_endian_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements as a flat uint8 CPU tensor of little-endian C-order bytes (no copy when it can be avoided)."""
    data = tensor.detach().cpu().contiguous()
    if not LITTLE_ENDIAN_HOST:
        data = swap_bytes(data)
    return data.reshape(-1).view(torch.uint8)


def tensor_from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: list[int], what: str) -> torch.Tensor:
    """The tensor that little-endian ``data`` holds, checked against ``shape`` first (``WireFormatError`` says why not)."""
    if any(size < 0 for size in shape):
        raise WireFormatError(f"{what}: shape {shape} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireFormatError(f"{what}: shape {shape} of {dtype} needs {expected} bytes, got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=dtype).reshape(shape)
    return tensor if LITTLE_ENDIAN_HOST else swap_bytes(tensor)


def swap_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Reverse each element's bytes (only on a big-endian host: the wire is little-endian)."""
    size = tensor.dtype.itemsize
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).reshape(-1, size).flip(-1).contiguous()
    return raw.view(tensor.dtype).reshape(tensor.shape)


def _dtype_name(code: int) -> str:
    return cohort_pb2.TensorDtype.Name(code) if code in cohort_pb2.TensorDtype.values() else str(code)


def _allowed() -> str:
    return ", ".join(cohort_pb2.TensorDtype.Name(code) for code in PROTO_DTYPES)
