"""The ``rdml.v1.CohortService`` servicer: the gRPC transport over the shared step barrier.

External students join with their registration data and get a session; each Exchange stream
carries their frames into the same barrier the Ray students use. Every refusal is a status code
with a message, and the reason code travels in the trailing metadata (``rdml-reason``) so a
client can act on it (``non_finite`` sends a student back to its last checkpoint). A refused
frame never holds up the other students' step.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.messages import (
    BAD_TENSOR, DUPLICATE, HALTED, INVALID, NOT_EXTERNAL, NOT_LIVE, REASON_KEY, REASONS, TIMEOUT, UNKNOWN_STUDENT,
    EvalFrame, LogitsFrame, StudentInfo,
)
from rdml_dist.errors import CohortStepFailed, FrameRejected
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc
from rdml_dist.rpc.mapping import from_proto, to_proto
from rdml_dist.rpc.status import cohort_status
from rdml_dist.rpc.tensors import WireFormatError, decode_tensor, encode_tensor

MIN_WATCH_INTERVAL_S = 0.1


async def _refuse(context: grpc.aio.ServicerContext, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
    """Abort the call with the status of ``reason`` (or ``code``), the reason code in the trailing metadata."""
    context.set_trailing_metadata(((REASON_KEY, reason),))
    await context.abort(code or _status_of(reason), message)


def _status_of(reason: str) -> grpc.StatusCode:
    return grpc.StatusCode[REASONS[reason].grpc_status] if reason in REASONS else grpc.StatusCode.INVALID_ARGUMENT


async def _refuse_rejected(context: grpc.aio.ServicerContext, rejected: FrameRejected) -> None:
    """The core's refusal with the status code of its reason."""
    await _refuse(context, rejected.reason, str(rejected))


class CohortServicer(cohort_pb2_grpc.CohortServiceServicer):
    """Serves one cohort's barrier to students outside Ray and to status clients."""

    def __init__(self, barrier: CohortBarrier) -> None:
        self.barrier = barrier
        self.external = set(barrier.config.external_students())
        self.sessions: dict[str, str] = {}

    async def _check_member(self, context: grpc.aio.ServicerContext, student: str) -> None:
        if student not in self.barrier.core.members:
            await _refuse(context, UNKNOWN_STUDENT,
                          f"unknown student {student!r} (members: {', '.join(self.barrier.core.members)})")

    async def _check_session(self, context: grpc.aio.ServicerContext, student: str, session: str) -> None:
        await self._check_member(context, student)
        if self.sessions.get(student) != session:
            await _refuse(context, NOT_LIVE,
                          f"{student!r} has not joined with session {session!r}: call Join first")

    async def Join(self, request: cohort_pb2.JoinRequest, context: grpc.aio.ServicerContext) -> cohort_pb2.JoinResponse:
        name = request.student
        core = self.barrier.core
        await self._check_member(context, name)
        if name not in self.external:
            await _refuse(context, NOT_EXTERNAL,
                          f"student {name!r} runs as a Ray actor; only students marked external: true join over gRPC")
        if self.barrier.halted is not None:
            await _refuse(context, HALTED, f"the cohort is rolling back; join again shortly ({self.barrier.halted})",
                          grpc.StatusCode.UNAVAILABLE)
        sizes = {"num_train": request.num_train, "num_val": request.num_val, "num_classes": request.num_classes,
                 "steps_per_epoch": request.steps_per_epoch}
        if any(value <= 0 for value in sizes.values()):
            await _refuse(context, INVALID,
                          f"registration of {name!r} needs positive sizes, got {sizes}")
        with self.barrier.lock:
            live = name in core.live
        if live and request.session_id != self.sessions.get(name):
            await _refuse(context, DUPLICATE,
                          f"student {name!r} has already joined this cohort; a second process cannot take its place")
        info = from_proto(StudentInfo, request)
        try:
            step = self.barrier.register(info, joining=True)  # the step it takes part from, as the core recorded it
        except FrameRejected as rejected:
            await _refuse_rejected(context, rejected)
        session = request.session_id if live else uuid.uuid4().hex
        self.sessions[name] = session
        with self.barrier.lock:
            fingerprint = next((other.data_fingerprint for other in core.info.values() if other.name != name), info.data_fingerprint)
        return cohort_pb2.JoinResponse(
            cohort=self.barrier.config.name, student=name, session_id=session, step=step,
            epoch=step // info.steps_per_epoch, steps_per_epoch=info.steps_per_epoch,
            epochs=self.barrier.config.training.epochs, data_fingerprint=fingerprint, members=core.members,
        )

    async def Exchange(
        self, request_iterator: AsyncIterator[cohort_pb2.ExchangeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cohort_pb2.ExchangeResponse]:
        student: str | None = None
        try:
            async for request in request_iterator:
                await self._check_session(context, request.student, request.session_id)
                student = request.student
                try:
                    logits = decode_tensor(request.logits, f"logits from {student!r}")
                except WireFormatError as error:
                    self.barrier.refuse(student, request.step, BAD_TENSOR)
                    await _refuse(context, BAD_TENSOR, str(error))
                frame = from_proto(LogitsFrame, request, logits=logits.float())
                try:
                    reply = await self.barrier.exchange(frame)
                except FrameRejected as rejected:
                    await _refuse_rejected(context, rejected)
                except CohortStepFailed as failed:
                    await _refuse(context, HALTED, str(failed))
                except asyncio.TimeoutError:
                    await _refuse(context, TIMEOUT,
                                  f"step {request.step} did not complete within the exchange timeout")
                # ``refresh`` belongs to sequential updates, which external students never take part in
                yield to_proto(cohort_pb2.ExchangeResponse, reply, leave_out=("refresh",),
                               grad=encode_tensor(reply.grad.to(logits.dtype)))
        except asyncio.CancelledError:
            if student is not None:  # the student went away mid-stream: its peers must not wait for it
                self.barrier.mark_dead(student)
            raise

    async def SubmitEvaluation(
        self, request: cohort_pb2.SubmitEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> cohort_pb2.SubmitEvaluationResponse:
        await self._check_session(context, request.student, request.session_id)
        try:
            frame = from_proto(EvalFrame, request, logits=decode_tensor(request.logits, "validation logits").float(),
                               labels=decode_tensor(request.labels, "validation labels", floating=False))
            evaluation = self.barrier.submit_eval(frame)
        except WireFormatError as error:
            await _refuse(context, BAD_TENSOR, str(error))
        except FrameRejected as rejected:
            code = grpc.StatusCode.FAILED_PRECONDITION if request.student not in self.barrier.core.live else grpc.StatusCode.INVALID_ARGUMENT
            await _refuse(context, rejected.reason, str(rejected), code)
        return cohort_pb2.SubmitEvaluationResponse(scored=evaluation is not None)

    async def Leave(self, request: cohort_pb2.LeaveRequest, context: grpc.aio.ServicerContext) -> cohort_pb2.LeaveResponse:
        await self._check_session(context, request.student, request.session_id)
        self.barrier.mark_dead(request.student)
        del self.sessions[request.student]
        with self.barrier.lock:
            live = [name for name in self.barrier.core.members if name in self.barrier.core.live]
        return cohort_pb2.LeaveResponse(live=live)

    async def GetStatus(self, request: cohort_pb2.GetStatusRequest, context: grpc.aio.ServicerContext) -> cohort_pb2.GetStatusResponse:
        return cohort_pb2.GetStatusResponse(status=cohort_status(self.barrier))

    async def WatchStatus(
        self, request: cohort_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cohort_pb2.WatchStatusResponse]:
        interval = max(request.interval_seconds or 1.0, MIN_WATCH_INTERVAL_S)
        while True:
            yield cohort_pb2.WatchStatusResponse(status=cohort_status(self.barrier))
            await asyncio.sleep(interval)
