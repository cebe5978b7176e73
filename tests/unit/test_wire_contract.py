"""The wire contract: generated code matches the proto, the proto follows buf's STANDARD rules, tensors round-trip."""

import re
import tempfile
from pathlib import Path

import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from rdml_dist.rpc import codegen
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2
from rdml_dist.rpc.tensors import WireFormatError, decode_tensor, encode_tensor

PROTO = codegen.PROTO_ROOT / "rdml/v1/cohort.proto"


def test_committed_generated_code_is_what_the_pinned_compiler_writes() -> None:
    assert codegen.differences() == [], "run: python -m rdml_dist.rpc.codegen"


def test_a_changed_proto_is_noticed(tmp_path: Path) -> None:
    """The comparison can fail: a committed tree that lacks a file or holds other code differs."""
    (tmp_path / "rdml/v1").mkdir(parents=True)
    (tmp_path / "rdml/v1/cohort_pb2.py").write_text("# stale\n")
    assert set(codegen.differences(tmp_path)) == {"rdml/v1/cohort_pb2.py", "rdml/v1/cohort_pb2.pyi", "rdml/v1/cohort_pb2_grpc.py"}


@pytest.fixture(scope="module")
def described() -> descriptor_pb2.FileDescriptorProto:
    """The proto compiled with its comments (source info), as buf would read it."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "set.pb"
        include = Path(protoc.__file__).parent / "_proto"
        assert protoc.main(["protoc", f"-I{codegen.PROTO_ROOT}", f"-I{include}", "--include_source_info",
                            f"--descriptor_set_out={output}", "rdml/v1/cohort.proto"]) == 0
        files = descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes())
    return files.file[0]


def test_package_matches_its_directory_and_service_naming(described: descriptor_pb2.FileDescriptorProto) -> None:
    assert described.package == "rdml.v1" and described.name == "rdml/v1/cohort.proto"
    (service,) = described.service
    assert service.name == "CohortService"
    methods = {method.name: method for method in service.method}
    assert {"Join", "Exchange", "SubmitEvaluation", "Leave", "GetStatus", "WatchStatus"} <= set(methods)
    inputs = [method.input_type for method in service.method]
    assert len(set(inputs)) == len(inputs)  # one request message per RPC
    for name, method in methods.items():
        assert method.input_type == f".rdml.v1.{name}Request" and method.output_type == f".rdml.v1.{name}Response"
    assert methods["Exchange"].client_streaming and methods["Exchange"].server_streaming
    assert methods["WatchStatus"].server_streaming and not methods["WatchStatus"].client_streaming


def test_enums_fields_and_comments_follow_the_standard_style(described: descriptor_pb2.FileDescriptorProto) -> None:
    for enum in described.enum_type:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        assert enum.value[0].number == 0 and enum.value[0].name == f"{prefix}UNSPECIFIED"
        assert all(value.name.startswith(prefix) for value in enum.value)
    for message in described.message_type:
        for field in message.field:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", field.name), f"{message.name}.{field.name}"
    commented = {tuple(location.path) for location in described.source_code_info.location if location.leading_comments.strip()}
    missing = []
    for index, message in enumerate(described.message_type):
        if (4, index) not in commented:
            missing.append(message.name)
        missing += [f"{message.name}.{field.name}" for number, field in enumerate(message.field) if (4, index, 2, number) not in commented]
    for index, enum in enumerate(described.enum_type):
        if (5, index) not in commented:
            missing.append(enum.name)
        missing += [f"{enum.name}.{value.name}" for number, value in enumerate(enum.value) if (5, index, 2, number) not in commented]
    missing += [f"rpc {method.name}" for number, method in enumerate(described.service[0].method) if (6, 0, 2, number) not in commented]
    assert missing == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_tensors_round_trip_exactly(dtype: torch.dtype) -> None:
    tensor = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    message = encode_tensor(tensor)
    assert list(message.shape) == [5, 7] and len(message.data) == 35 * dtype.itemsize
    decoded = decode_tensor(cohort_pb2.Tensor.FromString(message.SerializeToString()), "t", floating=False)
    assert decoded.dtype == dtype and torch.equal(decoded, tensor)


def test_bytes_are_little_endian_c_order() -> None:
    message = encode_tensor(torch.tensor([[1.0, 2.0]], dtype=torch.float32).t())  # a transposed (non-contiguous) view
    assert list(message.shape) == [2, 1]
    assert message.data == bytes.fromhex("0000803f") + bytes.fromhex("00000040")


@pytest.mark.parametrize(
    "message,problem",
    [
        (cohort_pb2.Tensor(dtype=cohort_pb2.TENSOR_DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "TENSOR_DTYPE_UNSPECIFIED is not allowed"),
        (cohort_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "dtype 99 is not allowed"),
        (cohort_pb2.Tensor(dtype=cohort_pb2.TENSOR_DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20), "needs 24 bytes, got 20"),
        (cohort_pb2.Tensor(dtype=cohort_pb2.TENSOR_DTYPE_FLOAT32, shape=[-1, 3], data=b""), "negative dimension"),
        (cohort_pb2.Tensor(dtype=cohort_pb2.TENSOR_DTYPE_INT64, shape=[1], data=b"\0" * 8), "not a floating-point type"),
    ],
)
def test_undecodable_tensors_are_refused_naming_the_problem(message: cohort_pb2.Tensor, problem: str) -> None:
    with pytest.raises(WireFormatError, match=f"logits: .*{problem}"):
        decode_tensor(message, "logits")
