"""The coordinator's end of the frame lane: an asyncio TCP server on the barrier's event loop.

Each Ray student opens one connection, answers its challenge with its own key
(:mod:`rdml_dist.lane.handshake`: the name it claims is proved, and no secret crosses the wire), and
then sends one frame at a time. A connection that has not proved itself within
``HELLO_TIMEOUT_S`` is closed, and at most ``MAX_PENDING_HELLOS`` are held at once. A frame goes into the same
:class:`~rdml_dist.coordinator_core.barrier.CohortBarrier` as an actor call would take it; what the barrier
raises (a refusal, a halted cohort, a timeout) goes back as an error message with its reason code,
which the client turns into the same exception.
"""

import asyncio
import socket
from typing import Any

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.messages import BAD_TENSOR, HALTED, TIMEOUT, UNAUTHENTICATED
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.lane.handshake import HELLO_TIMEOUT_S, MAX_PENDING_HELLOS, new_challenge, proves
from rdml_dist.lane.wire import LaneProtocolError, encode, frame_from, read_message, reply_header
from rdml_dist.rpc.auth import is_loopback


LOOPBACK = "127.0.0.1"


def lane_host(node_address: str, allow_plaintext: bool) -> str:
    """Where a coordinator shard's frame lane listens: its node's address only where that is loopback (every node on
    one machine) or ``runtime.exchange.allow_plaintext`` opens it (frames travel in clear there), the cohort service's
    rule for ``rpc.host``; else on loopback, for the students on its node (the others exchange through Ray's calls)."""
    return node_address if allow_plaintext or is_loopback(node_address) else LOOPBACK


def lanes_reach(student_node: str | None, shard_nodes: list[tuple[str, str]], allow_plaintext: bool) -> bool:
    """Whether every coordinator shard's lane, placed by :func:`lane_host` on its node (``(node id, node address)``
    each), reaches a student on ``student_node``: one on loopback only reaches the students of its own node."""
    return all(node_id == student_node or lane_host(address, allow_plaintext) == address for node_id, address in shard_nodes)


def _refusal(reason: str, message: str) -> dict[str, Any]:
    """The header of an error answer: the refusal's reason code (rdml_dist.messages.reasons) and what happened."""
    return {"ok": False, "reason": reason, "message": message}


class FrameLaneServer:
    """Serves ``exchange`` and ``refresh`` requests of authenticated students into ``barrier``.

    ``secret`` is the run's lane secret, from which every student's key is derived again.
    """

    def __init__(self, barrier: CohortBarrier, secret: str, max_payload_bytes: int) -> None:
        self.barrier = barrier
        self.secret = secret
        self.max_payload_bytes = max_payload_bytes
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._pending_hellos = 0

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
            if self._pending_hellos >= MAX_PENDING_HELLOS:
                return  # too many connections that have not proved themselves: this one is closed unheard
            self._pending_hellos += 1
            try:
                student = await asyncio.wait_for(self._handshake(reader, writer), HELLO_TIMEOUT_S)
            finally:
                self._pending_hellos -= 1
            if student is None:
                return
            while True:
                header, payload = await read_message(reader, self.max_payload_bytes)
                await _send(writer, *await self._answer(student, header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, LaneProtocolError, asyncio.TimeoutError):
            pass  # the student went away, spoke nonsense or never proved itself: its actor's fate is the driver's
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """Challenge the connection; the student it proves to be, or None (refused, and told why)."""
        challenge = new_challenge()
        await _send(writer, {"challenge": challenge})
        hello, _ = await read_message(reader, 0)
        student, presented = hello.get("student"), hello.get("proof")
        if not isinstance(student, str) or not isinstance(presented, str) or not proves(self.secret, challenge, student, presented):
            await _send(writer, _refusal(UNAUTHENTICATED, "no valid proof of the student's lane key"))
            return None
        await _send(writer, {"ok": True})
        return student

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
