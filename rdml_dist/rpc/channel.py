"""A channel to a cohort's gRPC service and the calls that need no tensors: what ``rdml-dist status`` uses.

Only grpc and the generated messages: no torch and no pydantic, so the status command starts fast.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from rdml_dist.messages import REASON_KEY
from rdml_dist.rpc.auth import bearer_metadata
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc

if TYPE_CHECKING:  # only its fields are read: rdml-dist status passes config.defaults.RPC_CLIENT (no pydantic)
    from rdml_dist.config import RpcConfig
    from rdml_dist.config.defaults import RpcClientDefaults

    RpcSettings = RpcConfig | RpcClientDefaults


def message_options(rpc: "RpcSettings") -> list[tuple[str, int]]:
    """Send and receive limits sized for large logits (1024 x 21,841 float32 is 85 MiB)."""
    limit = rpc.max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


KEEPALIVE_MS = 20_000  # both ends ping a quiet connection: a peer whose machine vanished without a reset is noticed


def keepalive_options() -> list[tuple[str, int]]:
    """Ping every ``KEEPALIVE_MS`` (also between calls) and give up on a peer that does not answer within half that;
    pings that often are accepted from the other end."""
    return [("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_MS // 2),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)]


def open_channel(address: str, rpc: "RpcSettings", ca_file: str | None = None) -> grpc.Channel:
    """A channel to ``host:port`` with the cohort's message limits and keepalive; TLS when a CA certificate is given."""
    options = [*message_options(rpc), *keepalive_options()]
    if ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).expanduser().read_bytes())
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (UNKNOWN for an error that is not a call's)."""
    return error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN


def describe(error: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, for one-line messages."""
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{status_code(error).name}: {details}"


def rejection_reason(error: grpc.RpcError) -> str:
    """The coordinator's reason code for a refusal (``non_finite``, ``wrong_step`` …), or ''."""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    return dict(trailing or ()).get(REASON_KEY, "")


class StatusClient:
    """Calls on one coordinator with the cohort's token; this part reads the cohort's status."""

    def __init__(self, address: str, rpc: "RpcSettings", token: str | None = None, ca_file: str | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, rpc, ca_file)
        self.stub = cohort_pb2_grpc.CohortServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    def status(self, timeout_s: float | None = None) -> cohort_pb2.CohortStatus:
        return self.stub.GetStatus(cohort_pb2.GetStatusRequest(), metadata=self.metadata, timeout=timeout_s).status

    def watch(self, interval_s: float) -> Iterator[cohort_pb2.CohortStatus]:
        for update in self.stub.WatchStatus(cohort_pb2.WatchStatusRequest(interval_seconds=interval_s), metadata=self.metadata):
            yield update.status

    def close(self) -> None:
        self.channel.close()
