"""The tensor dtypes that may travel, with their name on the frame lane and their enum in ``protos/rdml/v1``.

The name is also torch's (``torch.float32``), so this table needs no torch import; :func:`torch_dtype`
resolves it when a transport encodes or decodes.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WireDtype:
    """One dtype on the wire; integer dtypes carry labels only, never logits or gradients."""

    name: str  # the frame lane header's ``dtype`` and the torch attribute
    proto: str  # the ``rdml.v1.TensorDtype`` value's name
    floating: bool


WIRE_DTYPES: dict[str, WireDtype] = {dtype.name: dtype for dtype in (
    WireDtype("float32", "TENSOR_DTYPE_FLOAT32", True),
    WireDtype("float16", "TENSOR_DTYPE_FLOAT16", True),
    WireDtype("bfloat16", "TENSOR_DTYPE_BFLOAT16", True),
    WireDtype("float64", "TENSOR_DTYPE_FLOAT64", True),
    WireDtype("int64", "TENSOR_DTYPE_INT64", False),
)}


def torch_dtype(dtype: WireDtype) -> "torch.dtype":
    """The torch dtype of a wire dtype."""
    import torch

    return getattr(torch, dtype.name)


def wire_dtype(dtype: "torch.dtype") -> WireDtype | None:
    """The wire dtype of a torch dtype, or None when it may not travel."""
    return WIRE_DTYPES.get(str(dtype).removeprefix("torch."))
