"""The student side of ``rdml.v1.CohortService``: what an external student uses (``rdml-dist status`` needs only
:mod:`rdml_dist.rpc.channel`)."""

import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import torch

from rdml_dist.messages import EvalFrame, LogitsFrame, MimicryReply, StudentInfo
from rdml_dist.rpc.channel import StatusClient
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc
from rdml_dist.rpc.mapping import from_proto, to_proto
from rdml_dist.rpc.tensors import decode_tensor, encode_tensor

if TYPE_CHECKING:
    from rdml_dist.rpc.channel import RpcSettings


class ExchangeStream:
    """One Exchange stream in lock-step: :meth:`exchange` sends a frame and waits for its gradient."""

    def __init__(self, stub: cohort_pb2_grpc.CohortServiceStub, metadata: tuple[tuple[str, str], ...], session: str) -> None:
        self._requests: queue.Queue[cohort_pb2.ExchangeRequest | None] = queue.Queue()
        self._call = stub.Exchange(iter(self._requests.get, None), metadata=metadata)
        self._responses: Iterator[cohort_pb2.ExchangeResponse] = self._call
        self.session = session
        self._awaiting = False  # a frame is out and its gradient not yet received

    def exchange(self, frame: LogitsFrame, dtype: torch.dtype | None = None) -> MimicryReply:
        logits = frame.logits if dtype is None else frame.logits.to(dtype)
        self._requests.put(to_proto(cohort_pb2.ExchangeRequest, frame, session_id=self.session, logits=encode_tensor(logits)))
        self._awaiting = True
        reply = next(self._responses)
        self._awaiting = False
        return from_proto(MimicryReply, reply, grad=decode_tensor(reply.grad, "gradient").float())

    def close(self) -> None:
        """End the stream: a clean half-close between steps; a cancel (the student leaves) in the middle of one."""
        self._requests.put(None)
        if self._awaiting:
            self._call.cancel()
            return
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass  # the stream had already ended with an error, which the caller has handled


CALL_DEADLINE_S = 120.0  # a join, a score submission or a leave the coordinator has not answered by then failed


class CohortClient(StatusClient):
    """A student's calls on one coordinator with the cohort's token: join, exchange, evaluate, leave.

    Each unary call has a deadline, and the channel's keepalive ends the exchange stream, so a coordinator whose
    node vanished without a reset never leaves the student waiting.
    """

    def __init__(self, address: str, rpc: "RpcSettings", token: str | None = None, ca_file: str | None = None,
                 call_deadline_s: float = CALL_DEADLINE_S) -> None:
        super().__init__(address, rpc, token, ca_file)
        self.call_deadline_s = call_deadline_s

    def join(self, info: StudentInfo, session: str = "") -> cohort_pb2.JoinResponse:
        return self.stub.Join(to_proto(cohort_pb2.JoinRequest, info, session_id=session),
                              metadata=self.metadata, timeout=self.call_deadline_s)

    def stream(self, session: str) -> ExchangeStream:
        return ExchangeStream(self.stub, self.metadata, session)

    def submit_evaluation(self, frame: EvalFrame, session: str) -> bool:
        request = to_proto(cohort_pb2.SubmitEvaluationRequest, frame, session_id=session,
                           logits=encode_tensor(frame.logits), labels=encode_tensor(frame.labels))
        return self.stub.SubmitEvaluation(request, metadata=self.metadata, timeout=self.call_deadline_s).scored

    def leave(self, student: str, session: str, reason: str) -> list[str]:
        return list(self.stub.Leave(cohort_pb2.LeaveRequest(student=student, session_id=session, reason=reason),
                                    metadata=self.metadata, timeout=self.call_deadline_s).live)
