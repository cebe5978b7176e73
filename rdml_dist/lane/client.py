"""A student's end of the frame lane: one blocking socket to the coordinator, one request at a time.

It raises what the actor-call path raises (:class:`FrameRejected`, :class:`CohortStepFailed`,
``TimeoutError``), and :class:`CoordinatorUnreachable` when the connection breaks (the coordinator
died or restarted), so the student's loop and the driver's failure handling see one behaviour.
"""

import socket
from collections.abc import Callable
from typing import TypeVar

from rdml_dist.errors import CohortStepFailed, CoordinatorUnreachable, FrameRejected
from rdml_dist.messages import HALTED, INVALID, TIMEOUT, UNAUTHENTICATED, LogitsFrame, MimicryReply
from rdml_dist.lane.handshake import proof
from rdml_dist.lane.wire import LaneProtocolError, frame_header, receive_message, reply_from, send_message
from rdml_dist.coordinator_core.shards import join_replies, split_frame

CONNECT_TIMEOUT_S = 10.0
T = TypeVar("T")


class FrameLaneClient:
    """Connected to the coordinator at ``address`` as ``student``, proved by the student's own lane ``key``."""

    def __init__(self, address: str, key: str, student: str, timeout_s: float, max_payload_bytes: int) -> None:
        self.address = address
        self.max_payload_bytes = max_payload_bytes
        self.broken = False  # after a broken connection the next chunk connects again
        host, port = address.rsplit(":", 1)
        try:
            self._connection = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            raise CoordinatorUnreachable(f"cannot open the frame lane to the coordinator at {address} ({error})") from None
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connection.settimeout(timeout_s + CONNECT_TIMEOUT_S)  # the barrier times out first and says so
        challenge, _ = self._guarded(lambda: receive_message(self._connection, 0))
        if not isinstance(challenge.get("challenge"), str):
            self.close()
            raise CoordinatorUnreachable(f"the frame lane at {address} did not open with a challenge")
        self._request({"student": student, "proof": proof(key, challenge["challenge"], student)})

    def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Send one step's logits, wait for the mimicry gradient."""
        self.send("exchange", frame)
        return reply_from(*self.receive())

    def refresh(self, frame: LogitsFrame) -> None:
        """Sequential update: this student's logits after its update, for its later peers."""
        self.send("refresh", frame)
        self.receive()

    def _request(self, header: dict) -> tuple[dict, bytearray]:
        self._guarded(lambda: send_message(self._connection, header, None))
        return self.receive()

    def send(self, kind: str, frame: LogitsFrame) -> None:
        """Send a request without waiting for its answer (:meth:`receive` reads it): shards are asked side by side."""
        self._guarded(lambda: send_message(self._connection, frame_header(kind, frame), frame.logits))

    def receive(self) -> tuple[dict, bytearray]:
        """The answer to the request sent last, or the error it carries raised as the actor-call path raises it."""
        answer, payload = self._guarded(lambda: receive_message(self._connection, self.max_payload_bytes))
        if answer.get("ok"):
            return answer, payload
        message = str(answer.get("message", ""))
        reason = str(answer.get("reason", INVALID))
        if reason == HALTED:
            raise CohortStepFailed(message)
        if reason == TIMEOUT:
            raise TimeoutError(message)
        if reason == UNAUTHENTICATED:
            self.close()
            raise CoordinatorUnreachable(f"the coordinator at {self.address} refused the frame lane: {message}")
        raise FrameRejected(message, reason)

    def _guarded(self, operation: Callable[[], T]) -> T:
        """Run a socket operation; a timeout or a broken connection closes it (a late answer must not be read
        as the next request's) and is raised as the actor-call path raises it."""
        try:
            return operation()
        except socket.timeout:
            self.close()
            raise TimeoutError(f"no answer from the coordinator at {self.address} on the frame lane") from None
        except (OSError, LaneProtocolError) as error:
            self.close()
            raise CoordinatorUnreachable(f"the frame lane to the coordinator at {self.address} broke ({error})") from None

    def close(self) -> None:
        self.broken = True
        self._connection.close()


class ShardLanes:
    """A student's frame lanes to every coordinator shard (one when unsharded): each request is split by rows,
    sent to all shards side by side, and their answers joined into the one a single coordinator would give."""

    def __init__(self, addresses: list[str], key: str, student: str, timeout_s: float, max_payload_bytes: int) -> None:
        self.addresses = list(addresses)
        self._clients: list[FrameLaneClient] = []
        try:
            for address in addresses:
                self._clients.append(FrameLaneClient(address, key, student, timeout_s, max_payload_bytes))
        except BaseException:
            self.close()
            raise

    @property
    def broken(self) -> bool:
        return any(client.broken for client in self._clients)

    def exchange(self, frame: LogitsFrame) -> MimicryReply:
        return join_replies([reply_from(*answer) for answer in self._ask("exchange", frame)])

    def refresh(self, frame: LogitsFrame) -> None:
        self._ask("refresh", frame)

    def _ask(self, kind: str, frame: LogitsFrame) -> list[tuple[dict, bytearray]]:
        for client, part in zip(self._clients, split_frame(frame, len(self._clients))):
            client.send(kind, part)
        answers, failures = [], []
        for client in self._clients:
            try:
                answers.append(client.receive())
            except Exception as error:  # noqa: BLE001 - every answer is read first: none is left for the next request
                failures.append(error)
        if failures:  # a broken lane or a timeout says more than a refusal of the frame by another shard
            raise next((error for error in failures if not isinstance(error, FrameRejected)), failures[0])
        return answers

    def close(self) -> None:
        for client in self._clients:
            client.close()
