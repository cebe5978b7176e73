"""Where a sleeping-cohort step's time goes beyond the engine: this machine's limits, each measured alone.

benchmarks/engine_efficiency.py measures whole cohorts. This measures the pieces that bound them, so that
the gap between a cell and its target can be read as machine and engine parts:

- **Waking a process that slept.** Two processes answer each other one byte over a socket pair, back to
  back ("hot") and after the sender slept 5 ms, as a sleeping student does every step; and how far a
  5 ms ``time.sleep`` overshoots.
- **Moving a frame's bytes.** Loopback TCP round trips of 100 B, a 128×100 and a 128×1000 float32 frame,
  each way: what shared memory instead of TCP could save at most.
- **The lane server's transport alone.** An asyncio server answering lane-sized messages, written with
  streams (as ``rdml_dist.lane.server`` is) and as a ``BufferedProtocol`` that reads into its own
  buffer: its CPU per message.
- **A student's own step.** The sleeping cohort's student (``Student.forward_step`` and ``apply``, no Ray)
  with its sleep at 0 and at 5 ms: the CPU its torch and Python work costs, hot and after the sleep.
- **The coordinator per frame.** A real ``CohortBarrier`` and ``FrameLaneServer`` in this process, K client
  processes sending frames as fast as they are answered: the coordinator process's CPU per frame, its
  computation included.

Writes benchmarks/results/step_limits.{json,md}. Run (about 20 s):
    .venv/bin/python benchmarks/step_limits.py
    .venv/bin/python benchmarks/step_limits.py --coordinator-only 5   # those cells alone, to compare two commits
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rdml_dist.config import parse_config
from rdml_dist.coordinator_core.barrier import CohortBarrier
from rdml_dist.data import batch_plan, indices_hash
from rdml_dist.lane.client import FrameLaneClient
from rdml_dist.lane.handshake import student_key
from rdml_dist.lane.server import FrameLaneServer
from rdml_dist.messages import LogitsFrame, StepMeasures, StudentInfo
from rdml_dist.students.student import Student

sys.path.insert(0, str(Path(__file__).parent))  # sleeping_cohort, the engine benchmark's students

from plain_sockets import receive_exactly  # noqa: E402  (beside this script)

RESULTS = Path(__file__).parent / "results"
BATCH = 128
SLEEP_S = 0.005
FORK = multiprocessing.get_context("fork")


@contextlib.contextmanager
def _loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running on its own thread, stopped and closed on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def _children(target: Callable[..., None], argument_lists: list[tuple[Any, ...]]) -> Iterator[None]:
    """One forked process per argument list, started; on exit each is waited for and, if still alive, ended."""
    processes = [FORK.Process(target=target, args=arguments, daemon=True) for arguments in argument_lists]
    for process in processes:
        process.start()
    try:
        yield
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(10)


def _median_of_runs(measure: Callable[[], float], runs: int = 3) -> float:
    return statistics.median(measure() for _ in range(runs))


def _median_run(measure: Callable[[], dict[str, float]], runs: int = 3) -> dict[str, float]:
    """Each value's median over ``runs`` runs, with every run's values beside it (a cohort's cell varies from run to run)."""
    results = [measure() for _ in range(runs)]
    return {**{key: statistics.median(result[key] for result in results) for key in results[0]}, "runs": results}


# --- waking a process that slept ----------------------------------------------------------------------------

def wake_up() -> dict[str, float]:
    """One-byte round trips between two processes, hot and after a 5 ms sleep; the 5 ms sleep's overshoot."""
    mine, theirs = socket.socketpair()

    def round_trips(count: int, sleep_s: float) -> float:
        total = 0.0
        for _ in range(count):
            if sleep_s:
                time.sleep(sleep_s)
            started = time.perf_counter()
            mine.send(b"x")
            mine.recv(1)
            total += time.perf_counter() - started
        return total / count

    with _children(_answer_bytes, [(theirs, mine)]):
        theirs.close()
        try:
            round_trips(200, 0.0)
            hot = _median_of_runs(lambda: round_trips(2000, 0.0))
            after_sleep = _median_of_runs(lambda: round_trips(200, SLEEP_S))
        finally:
            mine.close()  # ends the child's stream, and the child returns

    def overshoot() -> float:
        total = 0.0
        for _ in range(200):
            started = time.perf_counter()
            time.sleep(SLEEP_S)
            total += time.perf_counter() - started - SLEEP_S
        return total / 200

    return {"hot_round_trip_s": hot, "round_trip_after_sleep_s": after_sleep, "sleep_overshoot_s": _median_of_runs(overshoot)}


def _answer_bytes(connection: socket.socket, parents_end: socket.socket) -> None:
    parents_end.close()  # the child's copy: the parent's close must reach this end as the end of the stream
    while connection.recv(1):
        connection.send(b"x")


# --- moving a frame's bytes ------------------------------------------------------------------------------------

def loopback_round_trips() -> list[dict[str, Any]]:
    """Loopback TCP round trips (TCP_NODELAY, blocking sockets) of each size each way: wall and both ends' CPU."""
    rows = []
    for label, size in (("100 B", 100), ("128×100 float32", BATCH * 100 * 4), ("128×1000 float32", BATCH * 1000 * 4)):
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        for end in (client, server):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        count = 2000 if size < 100_000 else 400
        echo = threading.Thread(target=_echo, args=(server, size, count + 100))
        echo.start()
        data, buffer = bytes(size), bytearray(size)
        for _ in range(100):
            _round_trip(client, data, buffer)
        cpu, started = time.process_time(), time.perf_counter()
        for _ in range(count):
            _round_trip(client, data, buffer)
        rows.append({"size": label, "bytes": size, "round_trip_s": (time.perf_counter() - started) / count,
                     "cpu_s": (time.process_time() - cpu) / count})
        echo.join(10)
        for end in (client, server, listener):
            end.close()
    return rows


def _round_trip(connection: socket.socket, data: bytes, buffer: bytearray) -> None:
    connection.sendall(data)
    receive_exactly(connection, len(buffer), buffer)


def _echo(connection: socket.socket, size: int, count: int) -> None:
    buffer = bytearray(size)
    for _ in range(count):
        receive_exactly(connection, size, buffer)
        connection.sendall(buffer)


# --- the lane server's transport alone ------------------------------------------------------------------------

PAYLOAD = BATCH * 100 * 4
HEADER = json.dumps({"ok": True, "step": 1, "mimicry_loss": 0.1, "alpha": 2.0, "weight": 1.0, "live_students": 2,
                     "refresh": False, "dtype": "float32", "shape": [BATCH, 100]}).encode()
MESSAGE = len(HEADER).to_bytes(4, "big") + PAYLOAD.to_bytes(8, "big") + HEADER + bytes(PAYLOAD)


async def _streams_server() -> asyncio.base_events.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = memoryview(bytes(PAYLOAD))
        try:
            while True:
                prefix = await reader.readexactly(12)
                header = await reader.readexactly(int.from_bytes(prefix[:4], "big"))
                bytearray(await reader.readexactly(int.from_bytes(prefix[4:], "big")))
                writer.writelines([prefix + header, reply])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


class _BufferedLane(asyncio.BufferedProtocol):
    """Reads each part of a message (prefix, header, payload) straight into a buffer of its size; answers with one
    write."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = bytes(PAYLOAD)
        self.parts = [bytearray(12)]  # the prefix, then the header and the payload once the prefix has said their sizes
        self.filled = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.parts[-1])[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled < len(self.parts[-1]):
            return
        self.filled = 0
        prefix = self.parts[0]
        if len(self.parts) == 1:
            self.parts.append(bytearray(int.from_bytes(prefix[:4], "big")))
        elif len(self.parts) == 2:
            self.parts.append(bytearray(int.from_bytes(prefix[4:], "big")))
        else:
            self.transport.write(b"".join([prefix, self.parts[1], self.reply]))
            self.parts = [bytearray(12)]


async def _protocol_server() -> asyncio.base_events.Server:
    return await asyncio.get_running_loop().create_server(_BufferedLane, "127.0.0.1", 0)


def lane_transport(count: int = 3000) -> dict[str, float]:
    """The server process's CPU per lane-sized message and answer, for each way of writing the server."""
    results = {}
    for name, start in (("streams", _streams_server), ("buffered_protocol", _protocol_server)):
        samples = []
        for _ in range(3):
            with _loop_thread() as loop:
                server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
                ready, done = FORK.Queue(), FORK.Queue()
                try:
                    with _children(_send_messages, [(server.sockets[0].getsockname()[1], count, ready, done)]):
                        ready.get(timeout=30)
                        cpu = time.process_time()
                        done.get(timeout=120)
                        samples.append((time.process_time() - cpu) / count)
                finally:
                    server.close()
                    asyncio.run_coroutine_threadsafe(server.wait_closed(), loop).result(10)
        results[f"{name}_cpu_s"] = statistics.median(samples)
    return results


def _send_messages(port: int, count: int, ready: Any, done: Any) -> None:
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(len(MESSAGE))
    for _ in range(200):
        _round_trip(connection, MESSAGE, buffer)
    ready.put(True)
    for _ in range(count):
        _round_trip(connection, MESSAGE, buffer)
    done.put(True)
    connection.close()


# --- a student's own step ------------------------------------------------------------------------------------------

def student_step(steps: int = 120) -> dict[str, float]:
    """The sleeping cohort's student alone (one torch thread, a zero mimicry gradient): CPU per step, hot and after
    each 5 ms sleep."""
    results = {}
    for sleep_ms in (0.0, SLEEP_S * 1000):
        config = parse_config({
            "name": "student-step", "seed": 0,
            "data": {"name": "sleeping_cohort:random_features", "options": {"classes": 100, "samples": BATCH * 100}},
            "students": [{"name": f"s{index}", "model": "sleeping_cohort:sleeping_linear", "options": {"sleep_ms": sleep_ms}}
                         for index in range(2)],
            "training": {"epochs": 3, "batch_size": BATCH, "drop_last": True},
            "runtime": {"torch_threads": 1},
        })
        student = Student(config, 0)
        grad = torch.zeros(BATCH, 100)
        for step in range(20):
            student.forward_step(step)
            student.apply(grad)
        cpu = time.process_time()
        for step in range(20, 20 + steps):
            student.forward_step(step)
            student.apply(grad)
        results["hot_cpu_s" if sleep_ms == 0 else "after_sleep_cpu_s"] = (time.process_time() - cpu) / steps
    return results


# --- the coordinator per frame ---------------------------------------------------------------------------------------

LANE_SECRET = "step-limits"
NUM_TRAIN = BATCH * 50


def _coordinator_config(names: list[str]) -> Any:
    return parse_config({
        "name": "step-limits", "seed": 0, "students": [{"name": name, "model": "mlp"} for name in names],
        "training": {"batch_size": BATCH, "epochs": 100}, "mimicry": {"divergence": "renyi", "alpha": 2.0},
        "runtime": {"ray": {"exchange_timeout_s": 60}},
    })


def _batch_hashes(epochs: int) -> list[str]:
    return [indices_hash(indices) for epoch in range(epochs) for indices in batch_plan(NUM_TRAIN, BATCH, 0, epoch)]


def coordinator_per_frame(students: int, steps: int = 300) -> dict[str, float]:
    """The coordinator process's CPU per frame (transport, barrier, checks, computation, replies, metrics) with
    ``students`` client processes that answer at once."""
    names = [f"s{index}" for index in range(students)]
    steps_per_epoch = NUM_TRAIN // BATCH
    hashes = _batch_hashes(steps // steps_per_epoch + 1)
    with _loop_thread() as loop:
        barrier = CohortBarrier(_coordinator_config(names))
        for name in names:
            barrier.register(StudentInfo(name, NUM_TRAIN, 10, 100, steps_per_epoch, "same-data"))
        server = FrameLaneServer(barrier, LANE_SECRET, 1 << 26)
        address = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1"), loop).result(10)
        ready, done = FORK.Queue(), FORK.Queue()
        try:
            with _children(_exchange_frames, [(name, address, hashes, steps, ready, done) for name in names]):
                for _ in names:
                    ready.get(timeout=60)
                cpu, started = time.process_time(), time.perf_counter()
                for _ in names:
                    done.get(timeout=300)
                return {"cpu_per_frame_s": (time.process_time() - cpu) / (steps * students),
                        "step_s": (time.perf_counter() - started) / steps}
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)


def _exchange_frames(name: str, address: str, hashes: list[str], steps: int, ready: Any, done: Any) -> None:
    torch.set_num_threads(1)
    lane = FrameLaneClient(address, student_key(LANE_SECRET, name), name, 60.0, 1 << 26)
    logits = torch.randn(BATCH, 100)
    ready.put(True)
    measures = None
    for step in range(steps):
        started = time.perf_counter()
        lane.exchange(LogitsFrame(name, step, hashes[step], logits, 1.0, 1, BATCH, 1, measures))
        measures = StepMeasures(step, 0.0, time.perf_counter() - started)
    done.put(True)
    lane.close()


# --- the report -------------------------------------------------------------------------------------------------------

def render_markdown(report: dict[str, Any]) -> str:
    us = 1e6
    wake, student, lane = report["wake_up"], report["student_step"], report["lane_transport"]
    lines = [
        "# Step limits (benchmarks/step_limits.py)", "",
        f"Machine: {report['machine']}. Command: `python benchmarks/step_limits.py`. Medians of three runs for the wake-ups, the lane server and the coordinator (each coordinator cell's runs in the JSON); one run of 2,000 round trips (400 of the largest frame) for the loopback sizes and of 120 steps for the student.", "",
        "## Waking a process that slept", "",
        "| one-byte round trip between two processes | µs |", "|---|---|",
        f"| back to back | {wake['hot_round_trip_s'] * us:.1f} |",
        f"| after the sender slept 5 ms | {wake['round_trip_after_sleep_s'] * us:.1f} |",
        f"| overshoot of a 5 ms `time.sleep` | {wake['sleep_overshoot_s'] * us:.1f} |", "",
        "## Moving a frame's bytes over loopback TCP", "",
        "| each way | round trip µs | CPU of both ends µs |", "|---|---|---|",
        *[f"| {row['size']} | {row['round_trip_s'] * us:.1f} | {row['cpu_s'] * us:.1f} |" for row in report["loopback"]], "",
        "## The lane server's transport alone (128×100 float32 each way)", "",
        "| server written with | its CPU per message and answer, µs |", "|---|---|",
        f"| asyncio streams (as `rdml_dist.lane.server`) | {lane['streams_cpu_s'] * us:.1f} |",
        f"| asyncio `BufferedProtocol`, one write per answer | {lane['buffered_protocol_cpu_s'] * us:.1f} |", "",
        "## A student's own step (the sleeping cohort's student, no Ray, one torch thread)", "",
        "| | CPU per step µs |", "|---|---|",
        f"| back to back | {student['hot_cpu_s'] * us:.0f} |",
        f"| after a 5 ms sleep each step | {student['after_sleep_cpu_s'] * us:.0f} |", "",
        "## The coordinator per frame (real barrier and frame lane; clients answer at once)", "",
        "| K | coordinator CPU per frame µs | step ms |", "|---|---|---|",
        *[f"| {row['students']} | {row['cpu_per_frame_s'] * us:.0f} | {row['step_s'] * 1e3:.2f} |" for row in report["coordinator"]],
    ]
    return "\n".join(lines) + "\n"


def coordinator_cells(runs: int = 3) -> list[dict[str, Any]]:
    """The coordinator per frame at K = 2, 8 and 16, each cell the median of ``runs`` runs (every run kept)."""
    return [{"students": students, **_median_run(lambda: coordinator_per_frame(students), runs)} for students in (2, 8, 16)]


def compare_coordinator(runs: int) -> None:
    """Only the coordinator cells, ``runs`` runs each, printed and not written: run it on each of two commits, in
    turns, to compare their per-frame CPU (a cell varies from run to run by more than a small cut)."""
    for cell in coordinator_cells(runs):
        each = ", ".join(f"{run['cpu_per_frame_s'] * 1e6:.0f}" for run in cell["runs"])
        print(f"K = {cell['students']}: median {cell['cpu_per_frame_s'] * 1e6:.0f} µs of CPU a frame (runs: {each}); "
              f"step {cell['step_s'] * 1e3:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description="Where a sleeping-cohort step's time goes beyond the engine.")
    parser.add_argument("--coordinator-only", type=int, metavar="RUNS",
                        help="measure only the coordinator per frame, RUNS runs of each cell; print, write nothing")
    arguments = parser.parse_args()
    if arguments.coordinator_only is not None and arguments.coordinator_only < 1:
        parser.error(f"--coordinator-only needs at least 1 run, not {arguments.coordinator_only}")
    torch.set_num_threads(1)
    if arguments.coordinator_only is not None:
        compare_coordinator(arguments.coordinator_only)
        return 0
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}",
        "wake_up": wake_up(),
        "loopback": loopback_round_trips(),
        "lane_transport": lane_transport(),
        "student_step": student_step(),
        "coordinator": coordinator_cells(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_limits.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (RESULTS / "step_limits.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
