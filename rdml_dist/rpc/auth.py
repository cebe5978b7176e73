"""Who may talk to a cohort's gRPC service: a shared bearer token, TLS, and a safe default bind.

Every call but the standard health check must carry ``authorization: Bearer <token>`` when the
cohort has a token; the health service stays open because Kubernetes' native gRPC probes cannot
send metadata (it reveals only SERVING or NOT_SERVING). Off loopback the service refuses to
start without a token and TLS (or an explicit ``rpc.allow_plaintext`` for a private network).
"""

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from rdml_dist.errors import ConfigError

if TYPE_CHECKING:  # only its fields are read: rdml-dist status passes config.defaults.RPC_CLIENT and loads no pydantic
    from rdml_dist.config import RpcConfig
    from rdml_dist.config.defaults import RpcClientDefaults

AUTHORIZATION = "authorization"
OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def resolve_token(rpc: "RpcConfig | RpcClientDefaults", given: str | None = None) -> str | None:
    """The cohort token: given on the command line, else ``rpc.token``, else the ``rpc.token_env`` variable."""
    return given or rpc.token or os.environ.get(rpc.token_env) or None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(rpc: "RpcConfig", token: str | None) -> None:
    """Refuse a bind that would expose the cohort: off loopback a token and TLS are required."""
    if is_loopback(rpc.host):
        return
    if token is None:
        raise ConfigError(
            "rpc.host",
            f"{rpc.host} is not a loopback address and the cohort service has no token: set rpc.token or the "
            f"environment variable {rpc.token_env} (and TLS: rpc.tls_cert_file, rpc.tls_key_file), or bind to 127.0.0.1",
        )
    if rpc.tls_cert_file is None and not rpc.allow_plaintext:
        raise ConfigError(
            "rpc.host",
            f"{rpc.host} is not a loopback address and the cohort service has no TLS: set rpc.tls_cert_file and "
            "rpc.tls_key_file, or rpc.allow_plaintext: true on a private network (the token then travels in clear)",
        )


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates a client (none without a token)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED, before any handler runs, to a call without the cohort's token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = metadata.get(AUTHORIZATION)
        if presented is None:
            return _refusal(handler, "missing bearer token: send 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(str(presented).encode(), self._expected):
            return _refusal(handler, "wrong bearer token")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only answers UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **options)
    return grpc.unary_unary_rpc_method_handler(refuse, **options)
