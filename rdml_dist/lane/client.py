"""A student's end of the frame lane: one blocking socket to the coordinator, one request at a time.

It raises what the actor-call path raises (:class:`FrameRejected`, :class:`CohortStepFailed`,
``TimeoutError``), and :class:`CoordinatorUnreachable` when the connection breaks (the coordinator
died or restarted), so the student's loop and the driver's failure handling see one behaviour.
"""

import socket

from rdml_dist.errors import CohortStepFailed, CoordinatorUnreachable, FrameRejected
from rdml_dist.frames import LogitsFrame, MimicryReply
from rdml_dist.lane.wire import LaneProtocolError, frame_header, receive_message, reply_from, send_message

CONNECT_TIMEOUT_S = 10.0


class FrameLaneClient:
    """Connected to the coordinator at ``address`` as ``student``, authenticated by the run's ``secret``."""

    def __init__(self, address: str, secret: str, student: str, timeout_s: float, max_payload_bytes: int) -> None:
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
        self._request({"secret": secret, "student": student})

    def exchange(self, frame: LogitsFrame) -> MimicryReply:
        """Send one step's logits, wait for the mimicry gradient."""
        header, payload = self._request(frame_header("exchange", frame), frame)
        return reply_from(header, payload)

    def refresh(self, frame: LogitsFrame) -> None:
        """Sequential update: this student's logits after its update, for its later peers."""
        self._request(frame_header("refresh", frame), frame)

    def _request(self, header: dict, frame: LogitsFrame | None = None) -> tuple[dict, bytearray]:
        try:
            send_message(self._connection, header, None if frame is None else frame.logits)
            answer, payload = receive_message(self._connection, self.max_payload_bytes)
        except socket.timeout:
            self.close()  # a late answer must not be read as the next request's
            raise TimeoutError(f"no answer from the coordinator at {self.address} on the frame lane") from None
        except (OSError, LaneProtocolError) as error:
            self.close()
            raise CoordinatorUnreachable(f"the frame lane to the coordinator at {self.address} broke ({error})") from None
        if answer.get("ok"):
            return answer, payload
        message = str(answer.get("message", ""))
        error = answer.get("error")
        if error == "rejected":
            raise FrameRejected(message, str(answer.get("reason", "invalid")))
        if error == "halted":
            raise CohortStepFailed(message)
        if error == "timeout":
            raise TimeoutError(message)
        self.close()
        raise CoordinatorUnreachable(f"the coordinator at {self.address} refused the frame lane: {message}")

    def close(self) -> None:
        self.broken = True
        self._connection.close()
