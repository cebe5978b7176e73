"""The gRPC cohort service over real sockets: a real grpc.aio server on loopback and real clients.

The server runs on its own event loop thread around a real :class:`CohortBarrier`, exactly as
inside the coordinator actor; the students here are plain clients sending hand-made frames, so
every refusal can be provoked on purpose.
"""

import asyncio
import datetime
import ipaddress
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.config import ExperimentConfig, parse_config
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.divergence import mimicry_gradients
from rdml_dist.errors import ConfigError
from rdml_dist.messages import LogitsFrame, StudentInfo
from rdml_dist.rpc.auth import bearer_metadata
from rdml_dist.rpc.channel import rejection_reason
from rdml_dist.rpc.client import CohortClient, ExchangeStream
from rdml_dist.rpc.generated.rdml.v1 import cohort_pb2, cohort_pb2_grpc
from rdml_dist.rpc.server import CohortServer, start_cohort_server
from rdml_dist.rpc.tensors import encode_tensor
from tests.integration.cli_process import RDML_DIST, child_environment, free_port
from tests.integration.conftest import wait_until
from tests.unit.held_computation import HeldComputation

NUM_TRAIN, BATCH, CLASSES, SEED = 24, 8, 4, 3
STEPS = NUM_TRAIN // BATCH
TOKEN = "s3cret-token"
TIMEOUT = 20  # seconds, for every blocking wait


def cohort_config(names: list[str], host: str = "127.0.0.1", batch: int = BATCH, **rpc: Any) -> ExperimentConfig:
    return parse_config({
        "name": "wire", "seed": SEED,
        "students": [{"name": name, "model": "mlp", "external": True} for name in names],
        "training": {"batch_size": batch, "epochs": 2},
        "mimicry": {"alpha": 2.0, "temperature": 2.0, "weight": 0.5},
        "runtime": {"ray": {"exchange_timeout_s": TIMEOUT}},
        "rpc": {"host": host, "port": free_port(), **rpc},
    })


class RunningService:
    """A barrier and its gRPC server on a private event loop thread (what the coordinator actor hosts)."""

    def __init__(self, config: ExperimentConfig, token: str | None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.barrier = CohortBarrier(config)
        self.server: CohortServer | None = None
        self.server = self.call(start_cohort_server(self.barrier, token, "127.0.0.1"))

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def client(self, token: str | None = TOKEN) -> CohortClient:
        return CohortClient(self.server.address, self.config.rpc, token)

    def close(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def start_service() -> Iterator[Callable[..., RunningService]]:
    started: list[RunningService] = []

    def start(config: ExperimentConfig, token: str | None = TOKEN) -> RunningService:
        service = RunningService(config, token)
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


def info(name: str, batch: int = BATCH, num_train: int = NUM_TRAIN, fingerprint: str = "same-data") -> StudentInfo:
    return StudentInfo(name, num_train, 10, CLASSES, num_train // batch, fingerprint)


def frame(name: str, step: int, logits: torch.Tensor, batch: int = BATCH, num_train: int = NUM_TRAIN) -> LogitsFrame:
    steps = num_train // batch
    plan = batch_plan(num_train, batch, SEED, step // steps)
    return LogitsFrame(name, step, indices_hash(plan[step % steps]), logits, 1.0, 1, batch, 1)


def logits_for(seed: int, rows: int = BATCH, classes: int = CLASSES) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed))


class Cohort:
    """Joined clients of one service, one open stream each."""

    def __init__(self, service: RunningService, names: list[str]) -> None:
        self.service = service
        self.client = service.client()
        self.sessions = {name: self.client.join(info(name)).session_id for name in names}
        self.streams = {name: self.client.stream(session) for name, session in self.sessions.items()}
        self.pool = ThreadPoolExecutor(max_workers=len(names))

    def send(self, name: str, step: int, logits: torch.Tensor, **options: Any) -> Any:
        return self.pool.submit(self.streams[name].exchange, frame(name, step, logits), **options)

    def reopen(self, name: str) -> None:
        self.streams[name].close()
        self.streams[name] = self.client.stream(self.sessions[name])

    def raw(self, request: cohort_pb2.ExchangeRequest) -> grpc.RpcError:
        """Send one hand-made request on its own stream; returns the error it is refused with."""
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(self.client.stub.Exchange(iter([request]), metadata=self.client.metadata, timeout=TIMEOUT)))
        return refused.value

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        self.pool.shutdown()
        self.client.close()


@pytest.fixture
def trio(start_service: Callable[..., RunningService]) -> Iterator[Cohort]:
    cohort = Cohort(start_service(cohort_config(["a", "b", "c"])), ["a", "b", "c"])
    yield cohort
    cohort.close()


def request_from(cohort: Cohort, name: str, step: int, logits: torch.Tensor, /, **changes: Any) -> cohort_pb2.ExchangeRequest:
    valid = frame(name, step, logits)
    request = cohort_pb2.ExchangeRequest(student=name, session_id=cohort.sessions.get(name, ""), step=step,
                                         batch_hash=valid.batch_hash, logits=encode_tensor(logits), ce_loss=1.0,
                                         correct=1, labelled=BATCH, correct_clean=1)
    for field, value in changes.items():
        if field == "tensor":
            request.logits.CopyFrom(value)
        else:
            setattr(request, field, value)
    return request


def test_replies_are_the_in_process_mimicry_gradients(trio: Cohort) -> None:
    logits = {name: logits_for(seed) for seed, name in enumerate("abc")}
    pending = {name: trio.send(name, 0, logits[name]) for name in "abc"}
    replies = {name: future.result(TIMEOUT) for name, future in pending.items()}
    expected = mimicry_gradients(torch.stack([logits[name] for name in "abc"]), alpha=2.0, temperature=2.0)
    for position, name in enumerate("abc"):
        assert replies[name].step == 0 and replies[name].live_students == 3
        torch.testing.assert_close(replies[name].grad, expected.grads[position] * 2.0, rtol=1e-6, atol=1e-7)
        assert replies[name].mimicry_loss == pytest.approx(float(expected.losses[position]) * 2.0, rel=1e-6)


def test_status_and_the_cohort_state_are_answered_while_a_steps_computation_runs(trio: Cohort) -> None:
    """The computation runs off the event loop and outside the barrier's lock: a status call (on the loop) and a
    read of the core under the lock (Ray's ``state()``, on its control thread) do not wait for it to end."""
    barrier = trio.service.barrier
    held = HeldComputation(barrier, hold_s=TIMEOUT)

    def state_under_the_lock() -> dict[str, object]:  # what Ray's state() does on the actor's control thread
        assert barrier.lock.acquire(timeout=5), "the lock was held for the computation"
        try:
            return barrier.core.state()
        finally:
            barrier.lock.release()

    try:
        replies = [trio.send(name, 0, logits_for(seed)) for seed, name in enumerate("abc")]
        assert held.started.wait(TIMEOUT), "the step's computation never started"
        status = trio.client.status(timeout_s=5)  # a deadline far below the TIMEOUT the computation may last
        assert status.step == 0 and list(status.waiting_for) == [] and not any(future.done() for future in replies)
        with ThreadPoolExecutor(max_workers=1) as control_thread:
            assert control_thread.submit(state_under_the_lock).result(TIMEOUT)["step"] == 0
    finally:
        held.release()
    assert [future.result(TIMEOUT).step for future in replies] == [0, 0, 0]
    assert trio.client.status(timeout_s=5).step == 1


def test_half_precision_logits_get_half_precision_gradients(trio: Cohort) -> None:
    logits = {name: logits_for(seed).to(torch.bfloat16) for seed, name in enumerate("abc")}
    pending = {name: trio.send(name, 0, logits[name], dtype=torch.bfloat16) for name in "abc"}
    replies = {name: future.result(TIMEOUT) for name, future in pending.items()}
    expected = mimicry_gradients(torch.stack([logits[name].float() for name in "abc"]), alpha=2.0, temperature=2.0)
    for position, name in enumerate("abc"):
        torch.testing.assert_close(replies[name].grad, (expected.grads[position] * 2.0).to(torch.bfloat16).float())


@pytest.mark.parametrize(
    "changes,code,reason",
    [
        ({"tensor": encode_tensor(torch.zeros(BATCH, CLASSES + 1))}, grpc.StatusCode.INVALID_ARGUMENT, "wrong_shape"),
        ({"tensor": encode_tensor(torch.zeros(BATCH, CLASSES, dtype=torch.int64))}, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
        ({"tensor": cohort_pb2.Tensor(dtype=cohort_pb2.TENSOR_DTYPE_FLOAT32, shape=[BATCH, CLASSES], data=b"\0" * 7)},
         grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
        ({"tensor": encode_tensor(torch.full((BATCH, CLASSES), float("nan")))}, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        ({"ce_loss": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        ({"batch_hash": "0" * 16}, grpc.StatusCode.FAILED_PRECONDITION, "batch_mismatch"),
    ],
)
def test_a_bad_frame_gets_its_status_code_and_the_others_go_on(
    trio: Cohort, changes: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    waiting = [trio.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (2, "c"))]
    refused = trio.raw(request_from(trio, "b", 0, logits_for(1), **changes))
    assert refused.code() == code and rejection_reason(refused) == reason and refused.details()
    assert [future.result(TIMEOUT).live_students for future in waiting] == [2, 2]  # the step completed without b
    # The next step, the refused student included, succeeds for everyone.
    replies = [trio.send(name, 1, logits_for(seed)) for seed, name in enumerate("abc")]
    assert [future.result(TIMEOUT).live_students for future in replies] == [3, 3, 3]


def test_a_frame_for_another_step_is_refused_and_its_sender_resends(trio: Cohort) -> None:
    waiting = [trio.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (2, "c"))]
    for wrong in (1, 4):
        refused = trio.raw(request_from(trio, "b", wrong, logits_for(1)))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and rejection_reason(refused) == "wrong_step"
        assert f"is for step {wrong}, cohort is at step 0" in refused.details()
    b = trio.send("b", 0, logits_for(1))  # the cohort waited for b's frame of the current step
    assert [future.result(TIMEOUT).live_students for future in [*waiting, b]] == [3, 3, 3]


def test_unknown_and_duplicate_students_are_refused_and_the_cohort_goes_on(trio: Cohort) -> None:
    waiting = [trio.send(name, 0, logits_for(seed)) for seed, name in ((0, "a"), (2, "c"))]
    unknown = trio.raw(request_from(trio, "z", 0, logits_for(9)))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "unknown student 'z'" in unknown.details()
    with pytest.raises(grpc.RpcError) as joined:
        trio.client.join(info("z"))
    assert joined.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as duplicate:
        trio.client.join(info("b"))  # a second process claiming b's place (no session)
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already joined" in duplicate.value.details()
    impostor = trio.raw(request_from(trio, "b", 0, logits_for(1), session_id="not-b"))
    assert impostor.code() == grpc.StatusCode.FAILED_PRECONDITION
    b = trio.send("b", 0, logits_for(1))
    assert [future.result(TIMEOUT).live_students for future in [*waiting, b]] == [3, 3, 3]


def test_a_student_with_other_data_is_refused(start_service: Callable[..., RunningService]) -> None:
    service = start_service(cohort_config(["a", "b"]))
    client = service.client()
    client.join(info("a"))
    with pytest.raises(grpc.RpcError) as refused:
        client.join(info("b", fingerprint="other-data"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "data_fingerprint" in refused.value.details()
    client.close()


def test_a_student_that_disconnects_is_not_waited_for(trio: Cohort) -> None:
    call = trio.client.stub.Exchange(iter([request_from(trio, "a", 0, logits_for(0))]), metadata=trio.client.metadata)
    wait_until(lambda: trio.service.barrier.core.waiting_for() == ["b", "c"], "a's frame to arrive")
    call.cancel()  # the process of a goes away while it waits at the barrier
    wait_until(lambda: "a" not in trio.service.barrier.core.live, "a to be marked dead")
    replies = [trio.send(name, 0, logits_for(seed)) for seed, name in ((1, "b"), (2, "c"))]
    assert [future.result(TIMEOUT).step for future in replies] == [0, 0]
    rejoined = trio.client.join(info("a"))  # a restarted process takes its place again
    assert rejoined.step == 1 and rejoined.session_id != trio.sessions["a"]


def test_calls_without_the_token_or_with_a_wrong_one_are_unauthenticated(trio: Cohort) -> None:
    for token in (None, "wrong-token"):
        stranger = trio.service.client(token)
        for attempt in (lambda: stranger.status(), lambda: stranger.join(info("a")),
                        lambda: next(iter(stranger.stub.Exchange(iter([request_from(trio, "a", 0, logits_for(0))]),
                                                                 metadata=bearer_metadata(token))))):
            with pytest.raises(grpc.RpcError) as refused:
                attempt()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stranger.close()
    assert trio.service.barrier.core.waiting_for() == ["a", "b", "c"]  # nothing reached the barrier


def test_a_non_loopback_bind_needs_a_token_and_tls(start_service: Callable[..., RunningService]) -> None:
    with pytest.raises(ConfigError, match="not a loopback address and the cohort service has no token"):
        start_service(cohort_config(["a"], host="0.0.0.0"), token=None)
    with pytest.raises(ConfigError, match="has no TLS"):
        start_service(cohort_config(["a"], host="0.0.0.0"), token=TOKEN)


def test_reflection_lists_the_service_and_health_follows_the_cohort(start_service: Callable[..., RunningService]) -> None:
    service = start_service(cohort_config(["a", "b"]), token=None)
    channel = grpc.insecure_channel(service.server.address)
    database = ProtoReflectionDescriptorDatabase(channel)  # a generic client: it knows nothing of this project
    assert "rdml.v1.CohortService" in database.get_services()
    methods = {method.name for method in descriptor_pool.DescriptorPool(database).FindServiceByName("rdml.v1.CohortService").methods}
    assert {"Join", "Exchange", "SubmitEvaluation", "Leave", "GetStatus", "WatchStatus"} <= methods
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="rdml.v1.CohortService"), timeout=TIMEOUT).status

    assert serving() == health_pb2.HealthCheckResponse.NOT_SERVING  # nobody has joined yet
    client = service.client(None)
    client.join(info("a"))
    client.join(info("b"))
    wait_until(lambda: serving() == health_pb2.HealthCheckResponse.SERVING, "the health service to say SERVING", 5)
    client.close()
    channel.close()


def test_health_answers_without_the_token(trio: Cohort) -> None:
    channel = grpc.insecure_channel(trio.service.server.address)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
    assert status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    channel.close()


def test_logits_of_1024_by_21841_in_float32_fit(start_service: Callable[..., RunningService]) -> None:
    rows, classes, num_train = 1024, 21_841, 2048
    service = start_service(cohort_config(["a", "b"], batch=rows))
    client = service.client()
    sessions = {name: client.join(StudentInfo(name, num_train, 10, classes, 2, "x")).session_id for name in "ab"}
    streams: dict[str, ExchangeStream] = {name: client.stream(session) for name, session in sessions.items()}
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(streams[name].exchange, frame(name, 0, logits_for(seed, rows, classes), rows, num_train))
                   for seed, name in enumerate("ab")]
        replies = [future.result(60) for future in pending]
    assert all(reply.grad.shape == (rows, classes) for reply in replies)
    for stream in streams.values():
        stream.close()
    client.close()


def test_status_shows_the_live_cohort(trio: Cohort) -> None:
    for future in [trio.send(name, 0, logits_for(seed)) for seed, name in enumerate("abc")]:
        future.result(TIMEOUT)
    trio.send("a", 1, logits_for(5))
    wait_until(lambda: trio.service.barrier.core.waiting_for() == ["b", "c"], "a's frame of step 1 to arrive")
    status = trio.client.status()
    assert status.phase == cohort_pb2.COHORT_PHASE_TRAINING and status.step == 1 and list(status.waiting_for) == ["b", "c"]
    assert [(student.name, student.live, student.last_step) for student in status.students] == [("a", True, 0), ("b", True, 0), ("c", True, 0)]
    shown = subprocess.run([*RDML_DIST, "status", "--coordinator", trio.service.server.address, "--token", TOKEN],
                           env=child_environment(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "cohort wire: training, step 1/6 (epoch 0), alpha 2" in shown.stdout
    assert status.driver_state == "starting" and "; driver starting" in shown.stdout  # no driver has said otherwise
    assert "waiting for: b, c" in shown.stdout and all(f"\n{name} " in shown.stdout for name in "abc")
    watched = subprocess.Popen([*RDML_DIST, "status", "--coordinator", trio.service.server.address, "--watch",
                                "--interval", "0.2"], env=child_environment(RDML_RPC_TOKEN=TOKEN), stdout=subprocess.PIPE, text=True)
    try:
        headers: list[str] = []
        for line in iter(watched.stdout.readline, ""):
            if line.startswith("cohort wire:"):
                headers.append(line)
            if len(headers) == 2:
                break
        assert len(headers) == 2  # two updates of the followed cohort
    finally:
        watched.kill()
        watched.communicate(timeout=TIMEOUT)


def test_a_student_that_leaves_mid_step_is_answered_and_not_waited_for(trio: Cohort) -> None:
    a = trio.send("a", 0, logits_for(0))
    wait_until(lambda: trio.service.barrier.core.waiting_for() == ["b", "c"], "a's frame to arrive")
    assert trio.client.leave("b", trio.sessions["b"], "stopping") == ["a", "c"]
    c = trio.send("c", 0, logits_for(2))
    assert [future.result(TIMEOUT).live_students for future in (a, c)] == [2, 2]
    left = trio.raw(request_from(trio, "b", 1, logits_for(1)))  # its session ended with the Leave
    assert left.code() == grpc.StatusCode.FAILED_PRECONDITION and "call Join first" in left.details()


def test_joins_are_refused_while_the_cohort_rolls_back_and_bad_registrations_are_invalid(trio: Cohort) -> None:
    with pytest.raises(grpc.RpcError) as invalid:
        trio.client.join(StudentInfo("a", NUM_TRAIN, 10, CLASSES, 0, "same-data"), trio.sessions["a"])
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "positive sizes" in invalid.value.details()
    waiting = trio.send("a", 0, logits_for(0))
    wait_until(lambda: trio.service.barrier.core.waiting_for() == ["b", "c"], "a's frame to arrive")
    trio.service.barrier.abort("student c died")  # what the driver does before it restores a checkpoint
    with pytest.raises(grpc.RpcError) as aborted:
        waiting.result(TIMEOUT)
    assert aborted.value.code() == grpc.StatusCode.ABORTED and "student c died" in aborted.value.details()
    assert trio.client.status().phase == cohort_pb2.COHORT_PHASE_HALTED
    with pytest.raises(grpc.RpcError) as refused:
        trio.client.join(info("a"), trio.sessions["a"])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    trio.service.call(_restore(trio.service.barrier, 0))
    assert trio.client.join(info("a"), trio.sessions["a"]).step == 0  # the same session goes on


async def _restore(barrier: CohortBarrier, step: int) -> None:
    barrier.restore(step, [])


def test_a_refused_student_can_send_its_next_frame_before_its_peers_finish(trio: Cohort) -> None:
    """After a NaN refusal a student goes straight on; its next frame waits for the step, not refused as early."""
    refused = trio.raw(request_from(trio, "b", 0, logits_for(1), tensor=encode_tensor(torch.full((BATCH, CLASSES), float("nan")))))
    assert rejection_reason(refused) == "non_finite"
    trio.reopen("b")
    early = trio.send("b", 1, logits_for(4))  # before a and c have sent step 0
    wait_until(lambda: trio.service.barrier.core.waiting_for() == ["a", "c"], "the step to wait for a and c only")
    assert [future.result(TIMEOUT).live_students for future in (trio.send("a", 0, logits_for(0)), trio.send("c", 0, logits_for(2)))] == [2, 2]
    late = [trio.send(name, 1, logits_for(seed)) for seed, name in ((5, "a"), (6, "c"))]
    assert [future.result(TIMEOUT).step for future in (early, *late)] == [1, 1, 1]


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (the client trusts the certificate itself)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rdml-dist test coordinator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = directory / "coordinator.pem", directory / "coordinator.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate_file, key_file


def test_tls_serves_clients_that_trust_its_certificate_only(start_service: Callable[..., RunningService], tmp_path: Path) -> None:
    certificate, key = _self_signed_certificate(tmp_path)
    config = cohort_config(["a", "b"], tls_cert_file=str(certificate), tls_key_file=str(key))
    address = start_service(config, token=TOKEN).server.address  # on loopback, as every test here
    trusting = CohortClient(address, config.rpc, TOKEN, ca_file=str(certificate))
    assert trusting.join(info("a")).cohort == "wire"
    assert trusting.status(timeout_s=TIMEOUT).phase == cohort_pb2.COHORT_PHASE_FORMING
    trusting.close()
    plaintext = CohortClient(address, config.rpc, TOKEN)  # a client that does not speak TLS gets nowhere
    with pytest.raises(grpc.RpcError) as refused:
        plaintext.status(timeout_s=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    plaintext.close()
