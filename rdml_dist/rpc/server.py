"""Start the cohort's gRPC server (``grpc.aio``) on the event loop that owns the step barrier.

Besides ``rdml.v1.CohortService`` it serves the standard health service (NOT_SERVING until every
member has joined and while the cohort rolls back, SERVING while it trains) and server
reflection, so generic tools (grpcurl, grpcio's reflection client) can discover the API.
"""

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import RpcConfig
from rdml_dist.errors import ClusterError
from rdml_dist.metrics import reachable_address
from rdml_dist.rpc.auth import BearerTokenInterceptor, check_bind
from rdml_dist.rpc.channel import keepalive_options, message_options
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc
from rdml_dist.rpc.service import CohortServicer
from rdml_dist.rpc.status import cohort_phase

SERVICE_NAME = cohort_pb2.DESCRIPTOR.services_by_name["CohortService"].full_name
HEALTH_REFRESH_S = 0.2


def server_options(rpc: RpcConfig) -> list[tuple[str, int]]:
    """Message limits, keepalive (a student whose machine vanished is noticed, not waited for), and an exclusive
    port: grpc's default SO_REUSEPORT would let a second run on the same node bind the same port and split the
    students between two cohorts."""
    return [*message_options(rpc), ("grpc.so_reuseport", 0), *keepalive_options()]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _add_port(server: grpc.aio.Server, rpc: RpcConfig, port: int) -> int:
    """Listen on ``rpc.host:port`` (TLS when configured); returns the port taken, 0 when it could not bind."""
    bind = _bind(rpc.host, port)
    try:
        if rpc.tls_cert_file is not None and rpc.tls_key_file is not None:
            pair = (Path(rpc.tls_key_file).expanduser().read_bytes(), Path(rpc.tls_cert_file).expanduser().read_bytes())
            return server.add_secure_port(bind, grpc.ssl_server_credentials([pair]))
        return server.add_insecure_port(bind)
    except OSError as error:
        raise ClusterError(f"rpc: cannot serve the cohort service on {bind} ({error})") from None
    except RuntimeError:  # grpc's "Failed to bind to address"
        return 0


class CohortServer:
    """A running cohort service; ``address`` is where clients reach it."""

    def __init__(self, server: grpc.aio.Server, barrier: CohortBarrier, address: str) -> None:
        self.server = server
        self.barrier = barrier
        self.address = address
        self.health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None

    async def _keep_health_current(self) -> None:
        while True:
            serving = cohort_phase(self.barrier) == cohort_pb2.COHORT_PHASE_TRAINING
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", SERVICE_NAME):
                await self.health.set(service, status)
            await asyncio.sleep(HEALTH_REFRESH_S)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.server.stop(grace_s)


async def start_cohort_server(barrier: CohortBarrier, token: str | None, node_address: str) -> CohortServer:
    """Serve ``barrier`` on ``rpc.host:rpc.port``; must run on the barrier's event loop.

    External students are told the configured address, so with one the port is required. Without
    one nobody has to agree on it (``rdml-dist status`` reads it from the driver's output or
    ``placements.json``): a port already taken by another run on the node is replaced by a free one.
    """
    rpc = barrier.config.rpc
    check_bind(rpc, token)
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=server_options(rpc))
    cohort_pb2_grpc.add_CohortServiceServicer_to_server(CohortServicer(barrier), server)
    port = _add_port(server, rpc, rpc.port)
    if port == 0 and rpc.port != 0 and not barrier.config.external_students():
        port = _add_port(server, rpc, 0)
    if port == 0:
        raise ClusterError(f"rpc: cannot serve the cohort service on {_bind(rpc.host, rpc.port)} (the port is taken?); "
                           "choose another rpc.port")
    cohort = CohortServer(server, barrier, reachable_address(rpc.host, port, node_address))
    health_pb2_grpc.add_HealthServicer_to_server(cohort.health, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    await server.start()
    cohort._health_task = asyncio.get_running_loop().create_task(cohort._keep_health_current())
    return cohort
