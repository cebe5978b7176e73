"""The coordinator's end of the frame lane: an asyncio TCP server on the barrier's event loop.

Each Ray student opens one connection, proves it got the run's secret through Ray (the first
message), and then sends one frame at a time. A frame goes into the same
:class:`~rdml_dist.barrier.CohortBarrier` as an actor call would take it; what the barrier
raises (a refusal, a halted cohort, a timeout) goes back as an error message with its reason code,
which the client turns into the same exception.
"""

import asyncio
import hmac
import socket
from typing import Any

from rdml_dist.barrier import CohortBarrier
from rdml_dist.messages import BAD_TENSOR, HALTED, TIMEOUT, UNAUTHENTICATED
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.lane.wire import LaneProtocolError, encode, frame_from, read_message, reply_header


def _refusal(reason: str, message: str) -> dict[str, Any]:
    """The header of an error answer: the refusal's reason code (rdml_dist.messages.reasons) and what happened."""
    return {"ok": False, "reason": reason, "message": message}


class FrameLaneServer:
    """Serves ``exchange`` and ``refresh`` requests of authenticated students into ``barrier``."""

    def __init__(self, barrier: CohortBarrier, secret: str, max_payload_bytes: int) -> None:
        self.barrier = barrier
        self.secret = secret
        self.max_payload_bytes = max_payload_bytes
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> str:
        """Listen on ``host`` (a free port); returns ``host:port``. Must run on the barrier's event loop."""
        self._server = await asyncio.start_server(self._serve, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = writer.get_extra_info("socket")
        if connection is not None:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(writer)
        try:
            hello, _ = await read_message(reader, 0)
            if not hmac.compare_digest(str(hello.get("secret", "")).encode(), self.secret.encode()):
                await _send(writer, _refusal(UNAUTHENTICATED, "wrong or missing run secret"))
                return
            student = str(hello.get("student", ""))
            await _send(writer, {"ok": True})
            while True:
                header, payload = await read_message(reader, self.max_payload_bytes)
                await _send(writer, *await self._answer(student, header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, LaneProtocolError):
            pass  # the student went away (or spoke nonsense): its actor's fate is the driver's to handle
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, student: str, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], Any]:
        """The reply to one request, or the error message standing for what the barrier raised."""
        try:
            frame = frame_from(student, header, payload)
        except LaneProtocolError as error:
            step = header.get("step")
            self.barrier.refuse(student, step if isinstance(step, int) else -1, BAD_TENSOR)
            return _refusal(BAD_TENSOR, str(error)), None
        try:
            if header.get("kind") == "refresh":
                self.barrier.refresh(frame)
                return {"ok": True}, None
            reply = await self.barrier.exchange(frame)
        except FrameRejected as rejected:
            return _refusal(rejected.reason, str(rejected)), None
        except CohortStepFailed as failed:
            return _refusal(HALTED, str(failed)), None
        except asyncio.TimeoutError:
            return _refusal(TIMEOUT, f"step {frame.step} did not complete within the exchange timeout"), None
        return reply_header(reply), reply.grad

    async def stop(self) -> None:
        """Stop listening and close every student's connection (their clients raise CoordinatorUnreachable)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()


async def _send(writer: asyncio.StreamWriter, header: dict[str, Any], tensor: Any = None) -> None:
    writer.writelines(encode(header, tensor))
    await writer.drain()
