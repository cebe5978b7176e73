"""The per-step exchange over Ray actor calls vs gRPC streams, same machine, same run.

K sender Ray actors (no model, fixed B×C float32 logits, same resources for both transports) go
through a fresh ``CoordinatorActor`` in lock-step, one exchange per step:

- ``ray``: the config's K students are ordinary (Ray) students, registered by the driver; each
  sender calls ``coordinator.exchange.remote(frame)`` and waits for the reply, as the Ray
  student actors do;
- ``grpc``: the same K students are marked ``external: true``, the coordinator serves the gRPC
  cohort service on a free 127.0.0.1 port (``serve_rpc``, no token), each sender Joins over gRPC
  (the Join registers it) and exchanges through one ``ExchangeStream``, as ``rdml-dist student``
  does.

Every frame passes the coordinator's validation: batch_size = B, num_train = B × steps and
steps_per_epoch = steps, so each step's batch hash comes from ``batch_plan`` of epoch 0.

Each sender stamps, per step, when it sent its frame and when its reply came back (CLOCK_MONOTONIC,
one clock for every process of the machine). The per-step time reported is the **lock-step span**:
for each measured step, last reply received minus first frame sent over the K senders; the table
gives its median over the measured steps (warm-up steps dropped). Also reported: the median of the
per-step maximum round trip over senders, the mean cycle (measured steps' total time / steps), the
coordinator's batched computation for the step as the actor itself timed it (``coordinator_seconds``
of the step records) and the same mimicry computation alone in this process (one torch thread, as
exchange_overhead.py measures it), and grpc/ray ratios of the span and of the transport overhead
(span minus the in-actor computation).

Writes benchmarks/results/transport_exchange.{json,md}. Run (full: ~4 minutes on 2 cores; --quick:
fewer steps, ~1.5 minutes):
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
from rdml_dist.frames import LogitsFrame, MimicryReply, StudentInfo  # noqa: E402
from rdml_dist.rpc.client import CohortClient, ExchangeStream  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"
TRANSPORTS = ("ray", "grpc")
PAYLOADS = ((128, 100), (1024, 1000))
# (measured steps, warm-up steps) per payload, full and quick
STEPS = {"full": {(128, 100): (200, 10), (1024, 1000): (60, 4)}, "quick": {(128, 100): (50, 5), (1024, 1000): (10, 2)}}
QUIET_CORES = 0.25  # other processes' CPU use (in cores) below which the machine counts as quiet


def now() -> float:
    """CLOCK_MONOTONIC: one time base for every process on the machine, so senders' stamps compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class OutsideLoad:
    """CPU used by processes outside this benchmark's process tree (Ray's processes are its children).

    The machine is shared: another job's CPU use would land in the timings, so each measurement
    waits (within a budget) for a quiet machine and records how busy the rest of it was. Linux
    only (/proc); elsewhere it measures nothing.
    """

    def __init__(self, wait_budget_s: float) -> None:
        self.wait_budget_s = wait_budget_s
        self.available = Path("/proc/stat").exists()
        self.tick = os.sysconf("SC_CLK_TCK") if self.available else 100
        self._mark: tuple[float, int, int] | None = None

    @staticmethod
    def _busy_ticks() -> int:
        values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait (guest time is inside user)

    @staticmethod
    def _own_ticks() -> int:
        parents, ticks = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                parents[int(entry)] = int(fields[1])
                ticks[int(entry)] = int(fields[11]) + int(fields[12])
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        total, stack = 0, [os.getpid()]
        while stack:
            pid = stack.pop()
            total += ticks.get(pid, 0)
            stack.extend(children.get(pid, []))
        return total

    def start(self) -> None:
        if self.available:
            self._mark = (time.perf_counter(), self._busy_ticks(), self._own_ticks())

    def cores(self) -> float | None:
        """Other processes' CPU use since :meth:`start`, in cores."""
        if self._mark is None:
            return None
        began, busy, own = self._mark
        outside = (self._busy_ticks() - busy) - (self._own_ticks() - own)
        return max(outside, 0) / self.tick / max(time.perf_counter() - began, 1e-6)

    def wait_until_quiet(self, sample_s: float = 2.0) -> float:
        """Wait while other processes use QUIET_CORES or more, at most the remaining budget; returns seconds waited."""
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
    """A stand-in student with no model: sends fixed logits each step over one transport, stamps each exchange."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.client: CohortClient | None = None
        self.stream: ExchangeStream | None = None

    def ready(self) -> bool:
        """Returns once the actor is constructed, so actor start-up stays out of the timing."""
        return True

    def prepare(self, name: str, hashes: list[str], batch: int, classes: int) -> None:
        self.name = name
        self.hashes = hashes
        generator = torch.Generator().manual_seed(sum(map(ord, name)))  # same logits per name for both transports
        self.logits = torch.randn(batch, classes, generator=generator)

    def join(self, address: str, rpc: dict[str, Any], info: StudentInfo) -> str:
        """gRPC only: Join the cohort service (this registers the student) and open the Exchange stream."""
        self.client = CohortClient(address, RpcConfig.model_validate(rpc), None)
        joined = self.client.join(info, "")
        self.stream = self.client.stream(joined.session_id)
        return joined.session_id

    def run(self, coordinator: "ray.actor.ActorHandle | None") -> dict[str, Any]:
        """Every step: send the frame, wait for the gradient; ``coordinator`` None means over the gRPC stream."""
        sent_at, received_at = [], []
        checksum = None
        batch, classes = self.logits.shape
        for step, batch_hash in enumerate(self.hashes):
            frame = LogitsFrame(self.name, step, batch_hash, self.logits, ce_loss=1.0, correct=0, labelled=1)
            sent = now()
            if coordinator is None:
                assert self.stream is not None
                reply: MimicryReply = self.stream.exchange(frame)
            else:
                reply = ray.get(coordinator.exchange.remote(frame))
            received_at.append(now())
            sent_at.append(sent)
            if reply.step != step or tuple(reply.grad.shape) != (batch, classes):
                raise RuntimeError(f"{self.name}: step {step} answered with step {reply.step}, grad {tuple(reply.grad.shape)}")
            if step == 0:
                checksum = float(reply.grad.double().abs().sum())
        return {"sent": sent_at, "received": received_at, "first_grad_abs_sum": checksum, "live": reply.live_students}

    def close(self) -> None:
        """gRPC only: half-close the stream cleanly and close the channel."""
        if self.stream is not None:
            self.stream.close()
        if self.client is not None:
            self.client.close()
        self.stream = self.client = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def cohort_config(names: list[str], batch: int, transport: str) -> ExperimentConfig:
    """K students; for gRPC the same students marked external with the service on a fixed loopback port."""
    external = transport == "grpc"
    return parse_config(
        {
            "students": [{"model": "mlp", "name": name, "external": external} for name in names],
            "training": {"batch_size": batch, "epochs": 1},
            "rpc": {"enabled": True, "host": HOST, "port": free_port() if external else 0, "token": None},
        }
    )


def measure(senders: list[Any], transport: str, batch: int, classes: int, steps: int, warmup: int,
            load: OutsideLoad) -> dict[str, Any]:
    """One (transport, K, payload) run through a fresh coordinator actor."""
    students = len(senders)
    names = [f"s{index}" for index in range(students)]
    total = warmup + steps
    config = cohort_config(names, batch, transport)
    plan = batch_plan(batch * total, batch, config.seed, 0)
    hashes = [indices_hash(indices) for indices in plan]
    infos = [StudentInfo(name, batch * total, 1, classes, total) for name in names]
    coordinator = CoordinatorActor.remote(config.model_dump(mode="json"))
    address = None
    try:
        ray.get([sender.prepare.remote(name, hashes, batch, classes) for sender, name in zip(senders, names)])
        if transport == "ray":
            ray.get([coordinator.register.remote(info) for info in infos])
        else:
            address = ray.get(coordinator.serve_rpc.remote(None))
            if address is None:
                raise RuntimeError("serve_rpc returned no address although rpc.enabled is true")
            rpc = config.rpc.model_dump(mode="json")
            ray.get([sender.join.remote(address, rpc, info) for sender, info in zip(senders, infos)])
        state = ray.get(coordinator.state.remote())
        if state["unregistered"]:
            raise RuntimeError(f"not registered before the run: {state['unregistered']}")
        waited = load.wait_until_quiet()
        load.start()
        began = time.perf_counter()
        runs = ray.get([sender.run.remote(coordinator if transport == "ray" else None) for sender in senders])
        wall = time.perf_counter() - began
        outside = load.cores()
        state = ray.get(coordinator.state.remote())
        records = ray.get(coordinator.pop_records.remote(total))
    finally:
        if transport == "grpc":
            ray.get([sender.close.remote() for sender in senders])
        ray.kill(coordinator)
    if state["step"] != total:
        raise RuntimeError(f"the coordinator is at step {state['step']} after {total} steps")
    spans, max_round_trips = [], []
    for step in range(warmup, total):
        sent = [run["sent"][step] for run in runs]
        received = [run["received"][step] for run in runs]
        spans.append(max(received) - min(sent))
        max_round_trips.append(max(r - s for s, r in zip(sent, received)))
    first = min(run["sent"][warmup] for run in runs)
    last = max(run["received"][-1] for run in runs)
    coordinator_seconds = {record.step: record.coordinator_seconds for record in records if record.step >= warmup}
    frame_bytes = batch * classes * 4
    return {
        "transport": transport,
        "students": students,
        "batch": batch,
        "classes": classes,
        "frame_mib": frame_bytes / 2**20,
        "steps": steps,
        "warmup_steps": warmup,
        "address": address,
        "median_span_seconds": statistics.median(spans),
        "p90_span_seconds": statistics.quantiles(spans, n=10)[-1],
        "median_max_round_trip_seconds": statistics.median(max_round_trips),
        "mean_cycle_seconds": (last - first) / steps,
        "driver_wall_per_step_seconds": wall / total,
        "median_coordinator_compute_seconds": statistics.median(coordinator_seconds.values()),
        "waited_for_quiet_seconds": waited,
        "outside_cpu_cores_during_run": outside,
        "first_grad_abs_sum": [run["first_grad_abs_sum"] for run in runs],
        "live_students_in_replies": sorted({run["live"] for run in runs}),
    }


def compute_alone(students: int, batch: int, classes: int, repeats: int, load: OutsideLoad) -> float:
    """Median time of the batched mimicry computation for K×B×C in this process (one torch thread)."""
    load.wait_until_quiet()
    stacked = torch.randn(students, batch, classes)
    mimicry_gradients(stacked, alpha=2.0)
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        mimicry_gradients(stacked, alpha=2.0)
        times.append(time.perf_counter() - begun)
    return statistics.median(times)


def summarise(rows: list[dict[str, Any]], compute: dict[tuple[int, int, int], float]) -> list[dict[str, Any]]:
    """One line per (payload, K): both transports side by side, and the checks that their gradients agree."""
    table = []
    for (batch, classes) in sorted({(row["batch"], row["classes"]) for row in rows}):
        for students in sorted({row["students"] for row in rows}):
            pair = {row["transport"]: row for row in rows
                    if (row["batch"], row["classes"], row["students"]) == (batch, classes, students)}
            if set(pair) != set(TRANSPORTS):
                continue
            ray_row, grpc_row = pair["ray"], pair["grpc"]
            overhead = {t: pair[t]["median_span_seconds"] - pair[t]["median_coordinator_compute_seconds"] for t in TRANSPORTS}
            agree = all(abs(a - b) <= 1e-5 * max(abs(a), 1e-12)
                        for a, b in zip(ray_row["first_grad_abs_sum"], grpc_row["first_grad_abs_sum"]))
            table.append({
                "batch": batch,
                "classes": classes,
                "students": students,
                "ray_span_seconds": ray_row["median_span_seconds"],
                "grpc_span_seconds": grpc_row["median_span_seconds"],
                "grpc_over_ray": grpc_row["median_span_seconds"] / ray_row["median_span_seconds"],
                "coordinator_compute_seconds": {t: pair[t]["median_coordinator_compute_seconds"] for t in TRANSPORTS},
                "mimicry_compute_alone_seconds": compute[(students, batch, classes)],
                "transport_overhead_seconds": overhead,
                "grpc_over_ray_overhead": overhead["grpc"] / overhead["ray"] if overhead["ray"] > 0 else None,
                "same_gradients": agree,
            })
    return table


def render_markdown(results: dict[str, Any]) -> str:
    command = ".venv/bin/python benchmarks/transport_exchange.py" + (" --quick" if results["mode"] == "quick" else "")
    lines = [
        "# Per-step exchange: Ray actor calls vs gRPC streams (benchmarks/transport_exchange.py)",
        "",
        f"Machine: {results['machine']}. Mode: {results['mode']}. Command: `{command}`. Total {results['total_seconds']:.0f} s "
        f"(1-min load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after).",
        "",
        "K sender Ray actors (no model, 0.1 CPU each) send B×C float32 logits to a fresh `CoordinatorActor` in lock-step; "
        "`ray`: `coordinator.exchange.remote(frame)`; `grpc`: students `external: true`, Join over gRPC "
        f"({HOST}, no token), one `ExchangeStream` per sender. Step time = median over measured steps of the lock-step "
        "span (last reply received − first frame sent, over the K senders; warm-up steps dropped). "
        "Coordinator compute = the actor's own timing of the step's batched computation; compute alone = "
        "`mimicry_gradients` for K×B×C in the driver before Ray starts, one torch thread (the coordinator actor also has "
        f"{results['torch_threads_in_zero_cpu_actor']}). Transport overhead = span − coordinator compute. The machine is "
        "shared: before each measurement the benchmark waits (within a budget) until other processes use under "
        f"{QUIET_CORES} cores, and records their CPU use during the run (last column below).",
        "",
        "| B×C (MiB per frame) | K | ray ms | grpc ms | grpc / ray | coordinator compute ms (ray / grpc) | compute alone ms "
        "| overhead ms (ray / grpc) | grpc / ray overhead | same gradients |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        compute, overhead = row["coordinator_compute_seconds"], row["transport_overhead_seconds"]
        ratio = row["grpc_over_ray_overhead"]
        lines.append(
            f"| {row['batch']}×{row['classes']} ({row['batch'] * row['classes'] * 4 / 2**20:.2f}) | {row['students']} | "
            f"{1000 * row['ray_span_seconds']:.2f} | {1000 * row['grpc_span_seconds']:.2f} | **{row['grpc_over_ray']:.2f}×** | "
            f"{1000 * compute['ray']:.2f} / {1000 * compute['grpc']:.2f} | {1000 * row['mimicry_compute_alone_seconds']:.2f} | "
            f"{1000 * overhead['ray']:.2f} / {1000 * overhead['grpc']:.2f} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}×'} | {'yes' if row['same_gradients'] else 'NO'} |"
        )
    lines += [
        "",
        "All measurements (ms):",
        "",
        "| transport | B×C | K | steps (+warm-up) | median span | p90 span | median max round trip | mean cycle | driver wall / step "
        "| other processes' CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        outside = "n/a" if row["outside_cpu_cores_during_run"] is None else f"{row['outside_cpu_cores_during_run']:.2f}"
        lines.append(
            f"| {row['transport']} | {row['batch']}×{row['classes']} | {row['students']} | {row['steps']} (+{row['warmup_steps']}) | "
            f"{1000 * row['median_span_seconds']:.2f} | {1000 * row['p90_span_seconds']:.2f} | "
            f"{1000 * row['median_max_round_trip_seconds']:.2f} | {1000 * row['mean_cycle_seconds']:.2f} | "
            f"{1000 * row['driver_wall_per_step_seconds']:.2f} | {outside} |"
        )
    return "\n".join(lines) + "\n"


@ray.remote(num_cpus=0)
def actor_torch_threads() -> int:
    """torch's thread count in a zero-CPU Ray worker, as the coordinator actor (num_cpus=0) gets it."""
    return torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about 2.5 minutes instead of about 5)")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[2, 4, 8], help="cohort sizes K")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for transport_exchange.{json,md}")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds in all to wait for other processes to go quiet before measurements "
                             "(default 180, --quick 60; 0: never wait)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    if args.quiet_wait is None:
        args.quiet_wait = 60.0 if args.quick else 180.0
    started = time.perf_counter()
    load_before = os.getloadavg()
    load = OutsideLoad(args.quiet_wait)
    torch.set_num_threads(1)  # the computation alone, first, on a machine where Ray does not run yet
    compute = {
        (students, batch, classes): compute_alone(students, batch, classes, 50 if batch * classes < 10**6 else 10, load)
        for batch, classes in PAYLOADS for students in args.cohorts
    }
    ray.init(num_cpus=max(8, max(args.cohorts)), include_dashboard=False)
    runs = []
    try:
        threads = ray.get(actor_torch_threads.remote())
        senders = [FrameSender.remote() for _ in range(max(args.cohorts))]  # one pool, the first K serve each run
        ray.get([sender.ready.remote() for sender in senders])
        for batch, classes in PAYLOADS:
            steps, warmup = STEPS[mode][(batch, classes)]
            for students in args.cohorts:
                order = TRANSPORTS if (students + batch) % 2 == 0 else TRANSPORTS[::-1]  # alternate which goes first
                for transport in order:
                    row = measure(senders[:students], transport, batch, classes, steps, warmup, load)
                    runs.append(row)
                    print(f"{transport:>4} B×C={batch}×{classes} K={students}: median span "
                          f"{1000 * row['median_span_seconds']:.2f} ms, coordinator compute "
                          f"{1000 * row['median_coordinator_compute_seconds']:.2f} ms, other processes "
                          f"{row['outside_cpu_cores_during_run'] or 0:.2f} cores", flush=True)
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
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
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
