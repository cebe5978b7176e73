"""The per-step exchange over Ray actor calls, gRPC streams and the frame lane (TCP), same machine, same run.

K sender Ray actors (no model, fixed B×C float32 logits, 0.1 CPU and one torch thread each, the
same actors for both transports) exchange with a ``CoordinatorActor`` in lock-step, one exchange
per step. For each payload B×C and cohort size K, two fresh coordinators are started:

- ``ray``: a config with K ordinary (Ray) students, registered by the driver with
  ``StudentInfo(name, num_train, num_val, C, steps_per_epoch)``; each sender calls
  ``coordinator.exchange.remote(frame)`` and waits for the reply, as the Ray student actors do;
- ``grpc``: the same K students marked ``external: true``, ``rpc.port`` a free 127.0.0.1 port, no
  token; the coordinator serves the gRPC cohort service (``serve_rpc``), each sender Joins over
  gRPC (the Join registers it) and exchanges through one ``ExchangeStream``, as ``rdml-dist
  student`` does;
- ``tcp``: as ``ray``, but the coordinator opens its frame lane (``serve_lane``) and each sender
  exchanges through one ``FrameLaneClient``, as the Ray student actors do by default.

Every frame passes the coordinator's validation: batch_size = B, num_train = B × planned steps and
steps_per_epoch = planned steps, so every step's batch hash comes from ``batch_plan`` of epoch 0.
After a few warm-up steps on each transport, the measured steps run in chunks that alternate
between the transports (ray, grpc, tcp, tcp, grpc, ray, ...), so that slow drifts of the machine fall on
both alike; the first step of each chunk is a lead-in and is not counted.

Each sender stamps, per step, when it sent its frame and when its reply came back (CLOCK_MONOTONIC,
one clock for every process of the machine). The per-step time reported is the **lock-step span**:
for each measured step, last reply received minus first frame sent over the K senders; the tables
give its median over the measured steps. Also reported: the median of the per-step maximum round
trip over senders, the driver's wall time per step, the coordinator's batched computation of the
step as the actor itself timed it (``coordinator_seconds`` of its step records), the same mimicry
computation alone in this process (one torch thread, as exchange_overhead.py measures it), and
grpc/ray and tcp/ray ratios of the span and of the transport overhead (span minus the in-actor
computation). The transports' replies to the same first frames are compared (same gradients).

The machine may be shared: before each chunk the benchmark waits (within --quiet-wait seconds in
all) until processes outside its own process tree (Ray's processes are its children) use under
0.25 cores, records their CPU use during the chunk, and replaces a chunk during which they were
busy by another one while the budget lasts.

Writes benchmarks/results/transport_exchange.{json,md}. Run (on 2 cores, full: about 5 minutes plus
any waiting for a quiet machine; --quick: fewer steps, about 2 minutes plus waiting):
    .venv/bin/python benchmarks/transport_exchange.py [--quick]
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import grpc  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from google.protobuf import __version__ as protobuf_version  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

from rdml_dist.config import ExperimentConfig, RpcConfig, parse_config  # noqa: E402
from rdml_dist.data import batch_plan, indices_hash  # noqa: E402
from rdml_dist.divergence import mimicry_gradients  # noqa: E402
from rdml_dist.engines.ray_actors import CoordinatorActor  # noqa: E402
from rdml_dist.messages import LogitsFrame, MimicryReply, StudentInfo  # noqa: E402
from rdml_dist.lane.handshake import student_key  # noqa: E402
from rdml_dist.lane.client import FrameLaneClient  # noqa: E402
from rdml_dist.rpc.client import CohortClient, ExchangeStream  # noqa: E402

from proc_cpu import TICKS_PER_S, machine_ticks, process_ticks  # noqa: E402  (beside this script)

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"
TRANSPORTS = ("ray", "grpc", "tcp")
ALTERNATIVES = ("grpc", "tcp")  # each compared with actor calls
LANE_SECRET = "benchmark"
PAYLOADS = ((128, 100), (1024, 1000))
QUIET_CORES = 0.25  # other processes' CPU use (in cores) below which the machine counts as quiet


@dataclass(frozen=True)
class Schedule:
    """Steps of one (K, payload) cell, per transport: warm-up, then chunks of measured steps (+1 lead-in each)."""

    warmup: int
    chunks: int
    chunk_steps: int
    compute_repeats: int
    compute_warmup: int

    @property
    def measured(self) -> int:
        return self.chunks * self.chunk_steps

    @property
    def planned(self) -> int:
        """Steps of the batch plan: room for every chunk to be replaced once."""
        return self.warmup + 2 * self.chunks * (self.chunk_steps + 1)


SCHEDULES = {
    "full": {(128, 100): Schedule(10, 5, 60, 50, 5), (1024, 1000): Schedule(3, 8, 12, 15, 5)},
    "quick": {(128, 100): Schedule(5, 2, 25, 50, 5), (1024, 1000): Schedule(2, 2, 5, 5, 3)},
}


def now() -> float:
    """CLOCK_MONOTONIC: one time base for every process on the machine, so senders' stamps compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class OutsideLoad:
    """CPU used by processes outside this benchmark's process tree (Ray's processes are its children).

    The machine is shared: another job's CPU use would land in the timings, so each chunk waits
    (within a budget) for a quiet machine and records how busy the rest of it was. Linux only
    (/proc); elsewhere it measures nothing.
    """

    def __init__(self, wait_budget_s: float) -> None:
        self.wait_budget_s = wait_budget_s
        self.available = Path("/proc/stat").exists()
        self.tick = TICKS_PER_S
        self._mark: tuple[float, int, dict[int, int]] | None = None
        self._last: tuple[float, float] | None = None  # when the last reading ended, and its value

    @staticmethod
    def _busy_ticks() -> int:
        ticks = machine_ticks()
        return ticks.busy + ticks.steal  # all but idle and iowait

    @staticmethod
    def _own_ticks() -> dict[int, int]:
        """CPU ticks of each live process in this process's tree."""
        processes = process_ticks()
        children: dict[int, list[int]] = {}
        for pid, process in processes.items():
            children.setdefault(process.parent, []).append(pid)
        own, stack = {}, [os.getpid()]
        while stack:
            pid = stack.pop()
            own[pid] = processes[pid].ticks if pid in processes else 0
            stack.extend(children.get(pid, []))
        return own

    def start(self) -> None:
        if self.available:
            self._mark = (time.perf_counter(), self._busy_ticks(), self._own_ticks())

    def cores(self) -> float | None:
        """Other processes' CPU use since :meth:`start`, in cores (own processes that ended meanwhile count as other)."""
        if self._mark is None:
            return None
        began, busy, own = self._mark
        mine = sum(ticks - own.get(pid, 0) for pid, ticks in self._own_ticks().items())
        outside = (self._busy_ticks() - busy) - mine
        ended = time.perf_counter()
        cores = max(outside, 0) / self.tick / max(ended - began, 1e-6)
        self._last = (ended, cores)
        return cores

    def wait_until_quiet(self, sample_s: float = 1.0) -> float:
        """Wait while other processes use QUIET_CORES or more, at most the remaining budget; returns seconds waited.

        No wait when the last reading, taken within the last 5 s, was quiet.
        """
        if self._last is not None and time.perf_counter() - self._last[0] < 5.0 and self._last[1] < QUIET_CORES:
            return 0.0
        waited = 0.0
        while self.available and self.wait_budget_s > 0:
            self.start()
            time.sleep(sample_s)
            busy = self.cores() or 0.0
            if busy < QUIET_CORES:
                break
            waited += sample_s
            self.wait_budget_s -= sample_s
            print(f"  waiting for a quiet machine: other processes use {busy:.2f} cores", flush=True)
        return waited


@ray.remote(num_cpus=0.1)
class FrameSender:
    """A stand-in student with no model: sends fixed logits each step over either transport, stamps each exchange."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.client: CohortClient | None = None
        self.stream: ExchangeStream | None = None
        self.lane: FrameLaneClient | None = None

    def ready(self) -> bool:
        """Returns once the actor is constructed, so actor start-up stays out of the timing."""
        return True

    def prepare(self, name: str, hashes: list[str], batch: int, classes: int) -> None:
        self.name = name
        self.hashes = hashes
        generator = torch.Generator().manual_seed(sum(map(ord, name)))  # same logits per name for both transports
        self.logits = torch.randn(batch, classes, generator=generator)

    def join(self, address: str, rpc: dict[str, Any], info: StudentInfo) -> str:
        """gRPC: Join the cohort service (this registers the student) and open the Exchange stream."""
        self.client = CohortClient(address, RpcConfig.model_validate(rpc), None)
        joined = self.client.join(info, "")
        self.stream = self.client.stream(joined.session_id)
        return joined.session_id

    def connect_lane(self, address: str) -> None:
        """tcp: open the frame lane to the coordinator, as a Ray student actor does."""
        self.lane = FrameLaneClient(address, student_key(LANE_SECRET, self.name), self.name, 60.0, 1 << 28)

    def run(self, start: int, end: int, coordinator: "ray.actor.ActorHandle | None", transport: str) -> dict[str, Any]:
        """Steps ``[start, end)``: send the frame, wait for the gradient, over ``transport``."""
        sent_at, received_at = [], []
        checksum = None
        batch, classes = self.logits.shape
        for step in range(start, end):
            frame = LogitsFrame(self.name, step, self.hashes[step], self.logits, ce_loss=1.0, correct=0, labelled=1, correct_clean=0)
            sent = now()
            if transport == "grpc":
                assert self.stream is not None
                reply: MimicryReply = self.stream.exchange(frame)
            elif transport == "tcp":
                assert self.lane is not None
                reply = self.lane.exchange(frame)
            else:
                reply = ray.get(coordinator.exchange.remote(frame))
            received_at.append(now())
            sent_at.append(sent)
            if reply.step != step or tuple(reply.grad.shape) != (batch, classes):
                raise RuntimeError(f"{self.name}: step {step} answered with step {reply.step}, grad {tuple(reply.grad.shape)}")
            if checksum is None:
                checksum = float(reply.grad.double().abs().sum())
        return {"sent": sent_at, "received": received_at, "first_grad_abs_sum": checksum, "live": reply.live_students}

    def close(self) -> None:
        """gRPC: half-close the stream cleanly and close the channel."""
        if self.stream is not None:
            self.stream.close()
        if self.client is not None:
            self.client.close()
        if self.lane is not None:
            self.lane.close()
        self.stream = self.client = self.lane = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def cohort_config(names: list[str], batch: int, transport: str) -> ExperimentConfig:
    """K students; for gRPC the same students marked external, the service on a fixed loopback port."""
    external = transport == "grpc"
    return parse_config(
        {
            "students": [{"model": "mlp", "name": name, "external": external} for name in names],
            "training": {"batch_size": batch, "epochs": 1},
            "rpc": {"enabled": True, "host": HOST, "port": free_port() if external else 0, "token": None},
        }
    )


@dataclass
class Lane:
    """One transport's coordinator in a cell, its next step and the stamps of its kept measured steps."""

    transport: str
    config: ExperimentConfig
    coordinator: Any
    address: str | None = None
    step: int = 0
    spans: list[float] = field(default_factory=list)
    max_round_trips: list[float] = field(default_factory=list)
    measured_steps: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    wall_steps: int = 0
    first_grad_abs_sum: list[float] = field(default_factory=list)
    live: set[int] = field(default_factory=set)

    def run(self, senders: list[Any], steps: int) -> tuple[list[dict[str, Any]], float]:
        began = time.perf_counter()
        runs = ray.get([sender.run.remote(self.step, self.step + steps, self.coordinator, self.transport) for sender in senders])
        wall = time.perf_counter() - began
        if self.step == 0:
            self.first_grad_abs_sum = [run["first_grad_abs_sum"] for run in runs]
        self.live.update(run["live"] for run in runs)
        self.step += steps
        return runs, wall


def measure_cell(senders: list[Any], batch: int, classes: int, schedule: Schedule, load: OutsideLoad,
                 order: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every transport for one (K, payload): fresh coordinators, warm-up, then alternating measured chunks."""
    students = len(senders)
    names = [f"s{index}" for index in range(students)]
    lanes = {}
    for transport in order:
        config = cohort_config(names, batch, transport)
        lanes[transport] = Lane(transport, config, CoordinatorActor.remote(config.model_dump(mode="json")))
    config = lanes[order[0]].config
    plan = batch_plan(batch * schedule.planned, batch, config.seed, 0)
    hashes = [indices_hash(indices) for indices in plan]
    infos = [StudentInfo(name, batch * schedule.planned, 1, classes, schedule.planned) for name in names]
    try:
        ray.get([lane.coordinator.state.remote() for lane in lanes.values()])  # both started (import-bound, so together)
        ray.get([sender.prepare.remote(name, hashes, batch, classes) for sender, name in zip(senders, names)])
        ray.get([lanes[transport].coordinator.register.remote(info) for transport in ("ray", "tcp") for info in infos])
        tcp_lane = lanes["tcp"]
        tcp_lane.address = ray.get(tcp_lane.coordinator.serve_lane.remote(LANE_SECRET))
        ray.get([sender.connect_lane.remote(tcp_lane.address) for sender in senders])
        grpc_lane = lanes["grpc"]
        grpc_lane.address = ray.get(grpc_lane.coordinator.serve_rpc.remote(None))
        if grpc_lane.address is None:
            raise RuntimeError("serve_rpc returned no address although rpc.enabled is true")
        rpc = grpc_lane.config.rpc.model_dump(mode="json")
        ray.get([sender.join.remote(grpc_lane.address, rpc, info) for sender, info in zip(senders, infos)])
        for lane in lanes.values():
            unregistered = ray.get(lane.coordinator.state.remote())["unregistered"]
            if unregistered:
                raise RuntimeError(f"{lane.transport}: not registered before the run: {unregistered}")
        for transport in order:
            lanes[transport].run(senders, schedule.warmup)
        wanted = {transport: schedule.chunks for transport in order}
        chunk = 0
        while any(wanted.values()):
            for transport in order if chunk % 2 == 0 else order[::-1]:
                lane = lanes[transport]
                if not wanted[transport] or lane.step + schedule.chunk_steps + 1 > schedule.planned:
                    wanted[transport] = 0
                    continue
                waited = load.wait_until_quiet()
                load.start()
                runs, wall = lane.run(senders, schedule.chunk_steps + 1)
                outside = load.cores()
                busy = outside is not None and outside >= QUIET_CORES
                replaced = busy and load.wait_budget_s > 0
                if replaced:
                    load.wait_budget_s -= wall
                    print(f"  {transport}: other processes used {outside:.2f} cores during a chunk: running another",
                          flush=True)
                else:
                    wanted[transport] -= 1
                    lane.wall_seconds += wall
                    lane.wall_steps += schedule.chunk_steps + 1
                    first = lane.step - schedule.chunk_steps - 1
                    for offset in range(1, schedule.chunk_steps + 1):  # offset 0 is the chunk's lead-in
                        sent = [run["sent"][offset] for run in runs]
                        received = [run["received"][offset] for run in runs]
                        lane.spans.append(max(received) - min(sent))
                        lane.max_round_trips.append(max(r - s for s, r in zip(sent, received)))
                        lane.measured_steps.append(first + offset)
                lane.chunks.append({"first_step": lane.step - schedule.chunk_steps - 1, "steps": schedule.chunk_steps + 1,
                                    "waited_for_quiet_seconds": waited, "outside_cpu_cores": outside, "kept": not replaced})
            chunk += 1
        rows = []
        for transport in TRANSPORTS:
            lane = lanes[transport]
            state = ray.get(lane.coordinator.state.remote())
            if state["step"] != lane.step:
                raise RuntimeError(f"{transport}: the coordinator is at step {state['step']}, the senders at {lane.step}")
            records = ray.get(lane.coordinator.pop_records.remote(lane.step))
            kept = set(lane.measured_steps)
            compute = [record.coordinator_seconds for record in records if record.step in kept and record.student == names[0]]
            outside = [entry["outside_cpu_cores"] for entry in lane.chunks if entry["kept"] and entry["outside_cpu_cores"] is not None]
            rows.append({
                "transport": transport,
                "students": students,
                "batch": batch,
                "classes": classes,
                "frame_mib": batch * classes * 4 / 2**20,
                "measured_steps": len(lane.spans),
                "warmup_steps": schedule.warmup,
                "chunk_steps": schedule.chunk_steps,
                "address": lane.address,
                "median_span_seconds": statistics.median(lane.spans),
                "p90_span_seconds": statistics.quantiles(lane.spans, n=10)[-1],
                "median_max_round_trip_seconds": statistics.median(lane.max_round_trips),
                "driver_wall_per_step_seconds": lane.wall_seconds / lane.wall_steps,
                "median_coordinator_compute_seconds": statistics.median(compute),
                "max_outside_cpu_cores": max(outside) if outside else None,
                "chunks": lane.chunks,
                "first_grad_abs_sum": lane.first_grad_abs_sum,
                "live_students_in_replies": sorted(lane.live),
            })
        return rows
    finally:
        ray.get([sender.close.remote() for sender in senders])
        for lane in lanes.values():
            ray.kill(lane.coordinator)


def compute_alone(students: int, batch: int, classes: int, schedule: Schedule, load: OutsideLoad) -> dict[str, Any]:
    """Median time of the batched mimicry computation for K×B×C in this process (one torch thread), after warm-up calls.

    At 1024×1000 one call's time depends on how its large temporaries are allocated (freshly mapped
    pages are faulted in on every call) and varies by 2-3× between calls on a small VM; min and max
    are kept next to the median. The actor's own timing of the step (coordinator compute) is the
    one the transport overhead is computed from.
    """
    load.wait_until_quiet()
    stacked = torch.randn(students, batch, classes)
    for _ in range(schedule.compute_warmup):
        mimicry_gradients(stacked, alpha=2.0, with_targets=False)
    repeats = schedule.compute_repeats
    load.start()
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        mimicry_gradients(stacked, alpha=2.0, with_targets=False)
        times.append(time.perf_counter() - begun)
    return {"median_seconds": statistics.median(times), "min_seconds": min(times), "max_seconds": max(times),
            "repeats": repeats, "outside_cpu_cores": load.cores()}


def summarise(rows: list[dict[str, Any]], compute: dict[tuple[int, int, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (payload, K): every transport side by side, its ratios to actor calls, and whether the gradients agree."""
    table = []
    for batch, classes in PAYLOADS:
        for students in sorted({row["students"] for row in rows}):
            by_transport = {row["transport"]: row for row in rows
                            if (row["batch"], row["classes"], row["students"]) == (batch, classes, students)}
            if set(by_transport) != set(TRANSPORTS):
                continue
            span = {t: by_transport[t]["median_span_seconds"] for t in TRANSPORTS}
            coordinator = {t: by_transport[t]["median_coordinator_compute_seconds"] for t in TRANSPORTS}
            overhead = {t: span[t] - coordinator[t] for t in TRANSPORTS}
            reference = by_transport["ray"]["first_grad_abs_sum"]
            agree = all(abs(a - b) <= 1e-5 * max(abs(a), 1e-12)
                        for t in ALTERNATIVES for a, b in zip(reference, by_transport[t]["first_grad_abs_sum"]))
            alone = compute[(students, batch, classes)]
            table.append({
                "batch": batch,
                "classes": classes,
                "students": students,
                "span_seconds": span,
                "span_over_ray": {t: span[t] / span["ray"] for t in ALTERNATIVES},
                "coordinator_compute_seconds": coordinator,
                "mimicry_compute_alone_seconds": alone["median_seconds"],
                "mimicry_compute_alone_range_seconds": [alone["min_seconds"], alone["max_seconds"]],
                "mimicry_compute_alone_outside_cpu_cores": alone["outside_cpu_cores"],
                "transport_overhead_seconds": overhead,
                "overhead_over_ray": {t: overhead[t] / overhead["ray"] if overhead["ray"] > 0 else None for t in ALTERNATIVES},
                "same_gradients": agree,
            })
    return table


def render_markdown(results: dict[str, Any]) -> str:
    command = ".venv/bin/python benchmarks/transport_exchange.py" + (" --quick" if results["mode"] == "quick" else "")
    lines = [
        "# Per-step exchange: Ray actor calls vs gRPC streams vs the frame lane (benchmarks/transport_exchange.py)",
        "",
        f"Machine: {results['machine']}. Mode: {results['mode']}. Command: `{command}`. Total {results['total_seconds']:.0f} s.",
        "",
        "K sender Ray actors (no model, 0.1 CPU and 1 torch thread each) send B×C float32 logits to a fresh `CoordinatorActor` "
        "per transport, in lock-step; `ray`: `coordinator.exchange.remote(frame)`; `grpc`: students `external: true`, "
        f"Join over gRPC ({HOST}, no token), one `ExchangeStream` per sender; `tcp`: the coordinator's frame lane, one "
        "`FrameLaneClient` per sender (the Ray students' default). Measured steps run in chunks alternating "
        "between the transports. Step time = median over measured steps of the lock-step span (last reply received − "
        "first frame sent, over the K senders). Coordinator compute = the actor's own timing of the step's batched "
        "computation; compute alone = `mimicry_gradients` for K×B×C in the driver before Ray starts, one torch thread "
        f"(the coordinator actor also has {results['torch_threads_in_zero_cpu_actor']}). Transport overhead = span − "
        f"coordinator compute. Chunks during which other processes used {QUIET_CORES} cores or more were replaced while "
        "the waiting budget lasted (last column below: the most they used during a kept chunk).",
        "",
        "| B×C (MiB per frame) | K | ray ms | grpc ms (/ ray) | tcp ms (/ ray) | coordinator compute ms (ray / grpc / tcp) "
        "| compute alone ms | overhead ms (ray / grpc / tcp) | overhead / ray (grpc, tcp) | same gradients |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        span, compute, overhead = row["span_seconds"], row["coordinator_compute_seconds"], row["transport_overhead_seconds"]
        ratios = ", ".join("n/a" if row["overhead_over_ray"][t] is None else f"**{row['overhead_over_ray'][t]:.2f}×**"
                           for t in ALTERNATIVES)
        lines.append(
            f"| {row['batch']}×{row['classes']} ({row['batch'] * row['classes'] * 4 / 2**20:.2f}) | {row['students']} | "
            f"{1000 * span['ray']:.2f} | {1000 * span['grpc']:.2f} ({row['span_over_ray']['grpc']:.2f}×) | "
            f"{1000 * span['tcp']:.2f} ({row['span_over_ray']['tcp']:.2f}×) | "
            + " / ".join(f"{1000 * compute[t]:.2f}" for t in TRANSPORTS) + f" | {1000 * row['mimicry_compute_alone_seconds']:.2f} | "
            + " / ".join(f"{1000 * overhead[t]:.2f}" for t in TRANSPORTS) + f" | {ratios} | {'yes' if row['same_gradients'] else 'NO'} |"
        )
    busy = [row["mimicry_compute_alone_outside_cpu_cores"] for row in results["summary"]
            if row["mimicry_compute_alone_outside_cpu_cores"] is not None]
    if busy:
        lines += ["", f"Other processes used at most {max(busy):.2f} cores while the computation alone was timed."]
    lines += [
        "",
        "All measurements (ms):",
        "",
        "| transport | B×C | K | measured steps (chunks of, warm-up) | median span | p90 span | median max round trip "
        "| driver wall / step | chunks replaced | other processes' CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        outside = "n/a" if row["max_outside_cpu_cores"] is None else f"{row['max_outside_cpu_cores']:.2f}"
        replaced = sum(not chunk["kept"] for chunk in row["chunks"])
        lines.append(
            f"| {row['transport']} | {row['batch']}×{row['classes']} | {row['students']} | "
            f"{row['measured_steps']} ({row['chunk_steps']}, {row['warmup_steps']}) | "
            f"{1000 * row['median_span_seconds']:.2f} | {1000 * row['p90_span_seconds']:.2f} | "
            f"{1000 * row['median_max_round_trip_seconds']:.2f} | {1000 * row['driver_wall_per_step_seconds']:.2f} | "
            f"{replaced} | {outside} |"
        )
    return "\n".join(lines) + "\n"


@ray.remote(num_cpus=0)
def actor_torch_threads() -> int:
    """torch's thread count in a zero-CPU Ray worker, as the coordinator actor (num_cpus=0) gets it."""
    return torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about 2 minutes instead of 5 on 2 cores)")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[2, 4, 8], help="cohort sizes K")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for transport_exchange.{json,md}")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds in all to wait for other processes to go quiet and to replace chunks they disturbed "
                             "(default 180, --quick 60; 0: never)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    if args.quiet_wait is None:
        args.quiet_wait = 60.0 if args.quick else 180.0
    started = time.perf_counter()
    load = OutsideLoad(args.quiet_wait)
    torch.set_num_threads(1)  # the computation alone first, on a machine where Ray does not run yet
    compute = {
        (students, batch, classes): compute_alone(students, batch, classes, SCHEDULES[mode][(batch, classes)], load)
        for batch, classes in PAYLOADS for students in args.cohorts
    }
    ray.init(num_cpus=max(8, max(args.cohorts)), include_dashboard=False)
    runs = []
    try:
        threads = ray.get(actor_torch_threads.remote())
        senders = [FrameSender.remote() for _ in range(max(args.cohorts))]  # one pool, the first K serve each cell
        ray.get([sender.ready.remote() for sender in senders])
        cells = [(batch, classes, students) for batch, classes in PAYLOADS for students in args.cohorts]
        for index, (batch, classes, students) in enumerate(cells):
            order = TRANSPORTS if index % 2 == 0 else TRANSPORTS[::-1]  # which transport opens the cell
            rows = measure_cell(senders[:students], batch, classes, SCHEDULES[mode][(batch, classes)], load, order)
            runs += rows
            print(f"B×C={batch}×{classes} K={students}: "
                  + ", ".join(f"{row['transport']} {1000 * row['median_span_seconds']:.2f} ms (compute "
                              f"{1000 * row['median_coordinator_compute_seconds']:.2f})" for row in rows), flush=True)
        for sender in senders:
            ray.kill(sender)
    finally:
        ray.shutdown()
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, ray {ray.__version__}, grpcio {grpc.__version__}, "
        f"protobuf {protobuf_version} ({api_implementation.Type()})",
        "mode": mode,
        "host": HOST,
        "per_step_time": "median over measured steps of (last reply received - first frame sent) over the K senders",
        "torch_threads_in_zero_cpu_actor": threads,
        "quiet_cores": QUIET_CORES,
        "quiet_wait_budget_seconds": args.quiet_wait,
        "quiet_wait_budget_left_seconds": load.wait_budget_s,
        "summary": summarise(runs, compute),
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport_exchange.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    (args.out / "transport_exchange.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
