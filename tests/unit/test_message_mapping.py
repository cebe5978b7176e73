"""Each message the cohort service carries is its dataclass, field by field: nothing is dropped or renamed silently."""

from dataclasses import fields

import pytest
import torch
from google.protobuf.message import Message

from rdml_dist.messages import EvalFrame, LogitsFrame, MimicryReply, StepMeasures, StudentInfo
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2
from rdml_dist.rpc.mapping import PROTO_NAMES, from_proto, to_proto
from rdml_dist.rpc.tensors import decode_tensor, encode_tensor

LOGITS = torch.tensor([[0.5, -1.25], [2.0, 0.0]])
LABELS = torch.tensor([1, 0])
# each dataclass, its message, the fields only one side has (the request's session, sequential updates' refresh)
PAIRS: list[tuple[object, type[Message], tuple[str, ...], tuple[str, ...]]] = [
    (LogitsFrame("a", 7, "h3", LOGITS, 0.75, 3, 4, 2, StepMeasures(6, 0.012, 0.004)), cohort_pb2.ExchangeRequest, (), ("session_id",)),
    (LogitsFrame("a", 0, "h0", LOGITS, 0.5, 1, 2, 1, None), cohort_pb2.ExchangeRequest, (), ("session_id",)),
    (MimicryReply(7, LOGITS, 0.25, 2.0, 0.5, 3), cohort_pb2.ExchangeResponse, ("refresh",), ()),
    (EvalFrame("b", 2, LOGITS, LABELS, StepMeasures(35, 0.02, 0.001)), cohort_pb2.SubmitEvaluationRequest, (), ("session_id",)),
    (StudentInfo("c", 1000, 200, 10, 8, "f1ng3r"), cohort_pb2.JoinRequest, (), ("session_id",)),
    (StepMeasures(12, 0.0125, 0.0031), cohort_pb2.StepMeasures, (), ()),  # what the frames' ``previous`` carries
]


@pytest.mark.parametrize(("message", "proto", "only_here", "only_there"), PAIRS)
def test_every_field_of_a_message_is_a_field_of_its_proto_and_back(
    message: object, proto: type[Message], only_here: tuple[str, ...], only_there: tuple[str, ...]
) -> None:
    names = PROTO_NAMES.get(type(message), {})
    ours = {names.get(item.name, item.name) for item in fields(message)} - set(only_here)  # type: ignore[arg-type]
    assert ours | set(only_there) == {field.name for field in proto.DESCRIPTOR.fields}


@pytest.mark.parametrize(("message", "proto", "only_here", "only_there"), PAIRS)
def test_a_message_round_trips_through_its_proto(
    message: object, proto: type[Message], only_here: tuple[str, ...], only_there: tuple[str, ...]
) -> None:
    tensors = {item.name: getattr(message, item.name) for item in fields(message) if "Tensor" in str(item.type)}  # type: ignore[arg-type]
    encoded = to_proto(proto, message, leave_out=only_here, **{name: encode_tensor(value) for name, value in tensors.items()})
    wire = proto.FromString(encoded.SerializeToString())
    decoded = {name: decode_tensor(getattr(wire, name), name, floating=value.is_floating_point()) for name, value in tensors.items()}
    back = from_proto(type(message), wire, **decoded)
    for item in fields(message):  # type: ignore[arg-type]
        ours, theirs = getattr(message, item.name), getattr(back, item.name)
        assert torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs, item.name


def test_a_field_the_proto_lacks_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="refresh"):
        to_proto(cohort_pb2.ExchangeResponse, MimicryReply(1, LOGITS, 0.0, 2.0, 1.0, 2, refresh=True), grad=encode_tensor(LOGITS))
