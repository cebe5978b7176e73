"""The client side of ``rdml.v1.CohortService``: what an external student and ``rdml-dist status`` use."""

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from rdml_dist.config import RpcConfig
from rdml_dist.frames import EvalFrame, LogitsFrame, MimicryReply, StepTiming, StudentInfo
from rdml_dist.rpc.auth import bearer_metadata
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc
from rdml_dist.rpc.server import message_options
from rdml_dist.rpc.service import REASON_KEY
from rdml_dist.rpc.tensors import decode_tensor, encode_tensor


def open_channel(address: str, rpc: RpcConfig, ca_file: str | None = None) -> grpc.Channel:
    """A channel to ``host:port`` with the cohort's message limits; TLS when a CA certificate is given."""
    options = message_options(rpc)
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


def _timing_message(timing: StepTiming | None) -> dict[str, cohort_pb2.StepTiming]:
    if timing is None:
        return {}
    return {"previous": cohort_pb2.StepTiming(step=timing.step, compute_seconds=timing.compute_seconds,
                                              round_trip_seconds=timing.round_trip_seconds)}


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
        self._requests.put(cohort_pb2.ExchangeRequest(
            student=frame.student, session_id=self.session, step=frame.step, batch_hash=frame.batch_hash,
            logits=encode_tensor(logits), ce_loss=frame.ce_loss, correct=frame.correct, labelled=frame.labelled,
            correct_clean=frame.correct_clean,
            **_timing_message(frame.previous),
        ))
        self._awaiting = True
        reply = next(self._responses)
        self._awaiting = False
        return MimicryReply(reply.step, decode_tensor(reply.grad, "gradient").float(), reply.mimicry_loss, reply.alpha,
                            reply.weight, reply.live_students)

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


class CohortClient:
    """Calls on one coordinator with the cohort's token."""

    def __init__(self, address: str, rpc: RpcConfig, token: str | None = None, ca_file: str | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, rpc, ca_file)
        self.stub = cohort_pb2_grpc.CohortServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    def join(self, info: StudentInfo, session: str = "") -> cohort_pb2.JoinResponse:
        return self.stub.Join(cohort_pb2.JoinRequest(
            student=info.name, num_train=info.num_train, num_val=info.num_val, num_classes=info.num_classes,
            steps_per_epoch=info.steps_per_epoch, data_fingerprint=info.data_fingerprint, session_id=session,
        ), metadata=self.metadata)

    def stream(self, session: str) -> ExchangeStream:
        return ExchangeStream(self.stub, self.metadata, session)

    def submit_evaluation(self, frame: EvalFrame, session: str) -> bool:
        return self.stub.SubmitEvaluation(cohort_pb2.SubmitEvaluationRequest(
            student=frame.student, session_id=session, epoch=frame.epoch, logits=encode_tensor(frame.logits),
            labels=encode_tensor(frame.labels), **_timing_message(frame.previous),
        ), metadata=self.metadata).scored

    def leave(self, student: str, session: str, reason: str) -> list[str]:
        return list(self.stub.Leave(cohort_pb2.LeaveRequest(student=student, session_id=session, reason=reason),
                                    metadata=self.metadata).live)

    def status(self, timeout_s: float | None = None) -> cohort_pb2.CohortStatus:
        return self.stub.GetStatus(cohort_pb2.GetStatusRequest(), metadata=self.metadata, timeout=timeout_s).status

    def watch(self, interval_s: float) -> Iterator[cohort_pb2.CohortStatus]:
        for update in self.stub.WatchStatus(cohort_pb2.WatchStatusRequest(interval_seconds=interval_s), metadata=self.metadata):
            yield update.status

    def close(self) -> None:
        self.channel.close()
