"""What the engine adds to a step, against the floor of moving the same bytes, side by side in one run.

Cohorts of K students whose step is a fixed sleep of S ms (benchmarks/sleeping_cohort.py:
standing in for a GPU step, so the CPUs are free for the engine), real B×C logits, trained through the
real driver, actors, frame lane, barrier and coordinator on a simulated multi-node Ray cluster
(``ray.cluster_utils.Cluster``: a head and worker nodes on loopback). Per cell, from the run's step log
(the epochs after the first; medians over students and steps):

- step: each student's compute plus its round trip; efficiency = S / step;
- its parts: the student's own work beyond S, the coordinator's computation, the wait for the slowest
  peer at the barrier, and the rest (serialisation, transport, thread hops, headers, reply);
- own + computation: the median over the steps of each step's own work beyond S plus the coordinator's
  computation, a lower bound of its step beyond S, set against four times what the floor adds (the issue's 4×);
- where the CPU went meanwhile: every process's CPU time from /proc, per step, by whose work it does (the
  students' actors, the coordinator's, Ray's own processes, this driver), and how busy the machine was.
  Where the students' CPU alone fills the cores, no engine could reach the step a faster machine would.

The floor, in the same run: K plain processes that each sleep S ms, then send the same B×C float32 bytes
over a blocking loopback socket to one receiver, which answers each with as many bytes once all K
have arrived. What the engine adds beyond S, over what the floor adds beyond S, is the ratio the
issue's targets are written in.

Writes benchmarks/results/engine_efficiency.{json,md,png}. Run (about 9 min on 2 cores):
    .venv/bin/python benchmarks/engine_efficiency.py
    .venv/bin/python benchmarks/engine_efficiency.py --students 2 8 --sleep-ms 5 --classes 100   # a subset
"""

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import ray  # noqa: E402  (must follow the loopback setting)
import torch  # noqa: E402

from rdml_dist.config import parse_config  # noqa: E402
from rdml_dist.engines.ray_engine import run_ray  # noqa: E402
from rdml_dist.engines.session import new_session  # noqa: E402
from rdml_dist.run_records.step_log import read_step_log  # noqa: E402
from rdml_dist.run_records.storage import Storage  # noqa: E402

from plain_sockets import receive_exactly  # noqa: E402  (beside this script)
from proc_cpu import TICKS_PER_S, command_line, machine_ticks, process_ticks  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH = 128
STEPS_PER_EPOCH = 100  # long epochs: their ends (evaluation, checkpoint) weigh little in the CPU per step
MEASURED_EPOCHS = 2  # after the first, whose steps include the processes' warm-up
NODES = 2  # a head and one worker node, students spread over both


def _student_processes_fit(students: int) -> bool:
    """Each student is a process importing torch (about 600 MB here): keep the cohort within the machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return students * 650 * 2**20 < 0.8 * total


def engine_cell(students: int, sleep_ms: float, classes: int, cluster_address: str, scratch: Path) -> dict[str, Any]:
    """Train the sleeping cohort; the per-step medians of the epochs after the first, and where the CPU went then."""
    config = parse_config({
        "name": f"engine-k{students}-s{sleep_ms:g}-c{classes}",
        "seed": 0,
        "data": {"name": "sleeping_cohort:random_features", "options": {"classes": classes, "samples": BATCH * STEPS_PER_EPOCH}},
        "students": [{"name": f"s{index}", "model": "sleeping_cohort:sleeping_linear", "options": {"sleep_ms": sleep_ms}}
                     for index in range(students)],
        "training": {"epochs": 1 + MEASURED_EPOCHS, "batch_size": BATCH, "drop_last": True, "last_epochs_reported": 1},
        "mimicry": {"divergence": "renyi", "alpha": 2.0},
        "runtime": {"engine": "ray", "torch_threads": 1,
                    "ray": {"address": cluster_address, "cpus_per_student": 0.1, "placement_strategy": "SPREAD"},
                    "coordinator": {"cpus": 0.1}, "checkpoint": {"keep": 1}},
        "monitoring": {"port": 0},
        "rpc": {"port": 0},
    })
    run_dir = scratch / config.name
    cpu = CpuAtEpochEnds()
    with new_session(config, run_dir, engine="ray") as session:
        run_ray(session, show_progress=False, observers=[cpu]).finish()
    rows = [row for row in read_step_log(Storage(str(run_dir))) if row.epoch >= 1]
    sleep = sleep_ms / 1000

    def median(values: list[float]) -> float:
        return statistics.median(values)

    step = median([row.compute_seconds + row.round_trip_seconds for row in rows])
    own = median([row.compute_seconds - sleep for row in rows])
    coordinator = median([row.coordinator_seconds for row in rows])
    wait = median([row.wait_seconds for row in rows])
    rest = median([row.round_trip_seconds - row.coordinator_seconds - row.wait_seconds for row in rows])
    # each step's own work and computation together: a lower bound of that step's time beyond S, row by row
    own_and_computation = median([row.compute_seconds - sleep + row.coordinator_seconds for row in rows])
    return {"step_s": step, "efficiency": sleep / step, "student_own_s": own, "coordinator_s": coordinator,
            "wait_s": wait, "rest_s": rest, "own_and_computation_s": own_and_computation, "rows": len(rows),
            "cpu": cpu.measured(STEPS_PER_EPOCH * MEASURED_EPOCHS)}


# --- where the CPU goes: every process of the machine, read from /proc ----------------------------------------

CPU_GROUPS = ("students", "coordinator", "ray", "driver", "other")


def _process_group(pid: int, command: str) -> str:
    """Whose work a process does: the students' and the coordinator's actors, Ray's own processes, this driver."""
    if pid == os.getpid():
        return "driver"
    if command.startswith("ray::StudentActor"):
        return "students"
    if command.startswith("ray::Coordinator"):
        return "coordinator"
    return "ray" if "ray::" in command or "/ray/" in command else "other"  # workers, raylet, GCS, agents


def cpu_snapshot() -> dict[str, Any]:
    """The machine's busy and total CPU time and each process's, in seconds, with its group."""
    machine = machine_ticks()
    processes = {}
    for pid, process in process_ticks().items():
        command = command_line(pid)
        if command is not None:  # None: the process ended meanwhile
            processes[pid] = (_process_group(pid, command), process.ticks / TICKS_PER_S)
    return {"busy_s": machine.busy / TICKS_PER_S, "total_s": sum(machine) / TICKS_PER_S, "processes": processes}


class CpuAtEpochEnds:
    """A run observer that takes a :func:`cpu_snapshot` at each epoch's end, so the measured epochs' CPU can be split
    by who spent it (the window also holds their evaluations and checkpoints)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []

    def on_epoch(self, entry: dict[str, Any]) -> None:
        self.snapshots.append({**cpu_snapshot(), "wall_s": time.perf_counter()})

    def on_checkpoint(self, step: int, manifest: dict[str, Any]) -> None:
        pass

    def measured(self, steps: int) -> dict[str, float]:
        """CPU seconds per step of each group from the first epoch's end to the last one's, the wall time per step
        of that window, and the machine's busy share in it (1: both cores busy all the time)."""
        before, after = self.snapshots[0], self.snapshots[-1]
        per_step = dict.fromkeys(CPU_GROUPS, 0.0)
        for pid, (group, seconds) in after["processes"].items():  # one that ended inside the window is not counted
            earlier = before["processes"].get(pid)
            per_step[group] += (seconds - (earlier[1] if earlier else 0.0)) / steps
        busy = (after["busy_s"] - before["busy_s"]) / max(after["total_s"] - before["total_s"], 1e-9)
        per_step["wall"] = (after["wall_s"] - before["wall_s"]) / steps
        return {**{f"{group}_s": value for group, value in per_step.items()}, "machine_busy": busy}


# --- the floor: plain processes, plain sockets ------------------------------------------------------------


def _floor_sender(port: int, payload_bytes: int, sleep_s: float, steps: int, results: Any) -> None:
    payload = os.urandom(payload_bytes)
    buffer = bytearray(payload_bytes)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            time.sleep(sleep_s)
            connection.sendall(payload)
            receive_exactly(connection, payload_bytes, buffer)
            times.append(time.perf_counter() - started)
    results.put(times)


def floor_cell(students: int, sleep_ms: float, classes: int, steps: int = 200) -> dict[str, Any]:
    """K processes sleep S, send B×C float32 bytes to one receiver, which answers all once all have arrived."""
    payload_bytes = BATCH * classes * 4
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    senders = [context.Process(target=_floor_sender, args=(port, payload_bytes, sleep_ms / 1000, steps, results))
               for _ in range(students)]
    for sender in senders:
        sender.start()
    connections = []
    for _ in range(students):
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections.append(connection)
    reply = os.urandom(payload_bytes)
    buffer = bytearray(payload_bytes)

    def serve() -> None:
        for _ in range(steps):
            for connection in connections:
                receive_exactly(connection, payload_bytes, buffer)
            for connection in connections:
                connection.sendall(reply)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    times = [value for _ in senders for value in results.get(timeout=600)[steps // 5:]]
    server.join(timeout=60)
    for sender in senders:
        sender.join(timeout=60)
    for connection in [*connections, listener]:
        connection.close()
    step = statistics.median(times)
    return {"step_s": step, "efficiency": (sleep_ms / 1000) / step}


# --- report ------------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Engine efficiency (benchmarks/engine_efficiency.py)",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. Cluster: `ray.cluster_utils.Cluster`, "
        f"{NODES} nodes on loopback. Logits B×C with B = {BATCH}; {STEPS_PER_EPOCH} steps per epoch, the "
        f"{MEASURED_EPOCHS} epochs after the first measured (medians over students and steps).",
        "",
        "S: the sleep standing in for a student's GPU step (once a step, in the forward). Step: a student's compute plus its round trip. "
        "Engine adds / floor adds: (step − S) of the engine over (step − S) of the floor.",
        "",
        "| K | S ms | C | step ms | S / step | floor step ms | floor S / step | engine adds / floor adds | "
        "student's own ms | coordinator ms | wait ms | rest ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        engine, floor = cell["engine"], cell["floor"]
        ratio = _beyond_sleep(engine, cell) / max(_beyond_sleep(floor, cell), 1e-9)
        lines.append(
            f"| {cell['students']} | {cell['sleep_ms']:g} | {cell['classes']} | {1000 * engine['step_s']:.2f} | "
            f"{engine['efficiency']:.2f} | {1000 * floor['step_s']:.2f} | {floor['efficiency']:.2f} | {ratio:.1f}× | "
            f"{1000 * engine['student_own_s']:.2f} | {1000 * engine['coordinator_s']:.2f} | {1000 * engine['wait_s']:.2f} | "
            f"{1000 * engine['rest_s']:.2f} |")
    if results.get("skipped"):
        lines += ["", f"Not run: {results['skipped']}"]
    cores = results.get("cores", os.cpu_count() or 1)
    lines += [
        "",
        "## Where the CPU goes",
        "",
        f"CPU time of every process on the machine over the measured epochs (their evaluations and checkpoints "
        f"included), per step, by whose work it does; wall: the window's time per step. Busy: the share of the "
        f"{cores} cores busy in the window. Students' floor: the students' CPU per step spread over all "
        f"{cores} cores, a step no engine could beat on this machine; S / that floor: the efficiency it caps.",
        "",
        "| K | S ms | C | wall ms | busy | students ms | coordinator ms | Ray ms | driver ms | students' floor ms | "
        "S / students' floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        cpu = cell["engine"]["cpu"]
        floor = max(cpu["students_s"] / cores, cell["sleep_ms"] / 1000)
        lines.append(
            f"| {cell['students']} | {cell['sleep_ms']:g} | {cell['classes']} | {1000 * cpu['wall_s']:.2f} | "
            f"{cpu['machine_busy']:.0%} | {1000 * cpu['students_s']:.2f} | {1000 * cpu['coordinator_s']:.2f} | "
            f"{1000 * cpu['ray_s']:.2f} | {1000 * cpu['driver_s']:.2f} | {1000 * floor:.2f} | "
            f"{min(1.0, cell['sleep_ms'] / 1000 / floor):.2f} |")
    return "\n".join(lines + _own_and_computation_against_the_floor(results)) + "\n"


def _beyond_sleep(part: dict[str, Any], cell: dict[str, Any]) -> float:
    """What a step of the engine or the floor takes beyond S, in seconds."""
    return part["step_s"] - cell["sleep_ms"] / 1000


def _own_and_computation_against_the_floor(results: dict[str, Any]) -> list[str]:
    """Per cell, what the engine adds beyond S even if its exchange cost nothing (the student's own step after its
    sleep and the coordinator's computation) against four times what the floor adds, the issue's 4× target."""
    lines = [
        "",
        "## The 4× target against the student's own step and the coordinator's computation",
        "",
        "Each step's time beyond S holds the student's own work after its sleep (forward, loss, backward, optimizer "
        "step, and the sleep's overshoot, which the floor's senders pay too) and the coordinator's computation, "
        "inside its round trip. Own + computation: the median over the measured steps of their sum, a lower bound "
        "of the median step beyond S that an engine whose exchange (transport, barrier, headers, replies) cost "
        "nothing would still take; at K ≥ 8 both parts include waiting for a core. Left for the "
        "exchange: 4 × floor adds − (own + computation), negative where no exchange could bring the cell within "
        "4× of the floor. The exchange today: engine adds − (own + computation). From unrounded values.",
        "",
        "| K | S ms | C | floor adds ms | 4 × floor adds ms | own + computation ms | left for the exchange ms | "
        "the exchange today ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        engine = cell["engine"]
        floor_adds = _beyond_sleep(cell["floor"], cell)
        own_and_computation = engine["own_and_computation_s"]
        lines.append(
            f"| {cell['students']} | {cell['sleep_ms']:g} | {cell['classes']} | {_ms(floor_adds)} | "
            f"{_ms(4 * floor_adds)} | {_ms(own_and_computation)} | {_ms(4 * floor_adds - own_and_computation)} | "
            f"{_ms(_beyond_sleep(engine, cell) - own_and_computation)} |")
    return lines


def _ms(seconds: float) -> str:
    """Seconds as milliseconds to two places, a difference that rounds to zero shown as 0.00, not -0.00."""
    return f"{round(1000 * seconds, 2) + 0.0:.2f}"


def render_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, efficiency) = plt.subplots(1, 2, figsize=(12, 4.4))
    series: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for cell in results["cells"]:
        series.setdefault((cell["sleep_ms"], cell["classes"]), []).append(cell)
    for (sleep_ms, classes), cells in sorted(series.items()):
        cells = sorted(cells, key=lambda cell: cell["students"])
        ks = [cell["students"] for cell in cells]
        for axis, value in ((times, lambda part: 1000 * part["step_s"]), (efficiency, lambda part: part["efficiency"])):
            line = axis.plot(ks, [value(cell["engine"]) for cell in cells], marker="o", label=f"engine, S={sleep_ms:g} ms, C={classes}")
            axis.plot(ks, [value(cell["floor"]) for cell in cells], linestyle="--", color=line[0].get_color(),
                      label=f"floor, S={sleep_ms:g} ms, C={classes}")
    for axis in (times, efficiency):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("students K")
        axis.grid(alpha=0.3)
    times.set_ylabel("step (ms)")
    times.set_ylim(bottom=0)
    efficiency.set_ylabel("S / step (efficiency)")
    efficiency.set_ylim(0, 1.05)
    efficiency.legend(fontsize=7)
    figure.suptitle("What a step costs beyond its compute: the engine against plain sockets")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--sleep-ms", type=float, nargs="+", default=[5.0, 20.0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the saved JSON")
    args = parser.parse_args()
    json_path, md_path, png_path = (RESULTS / f"engine_efficiency.{suffix}" for suffix in ("json", "md", "png"))
    if not args.render_only:
        from ray.cluster_utils import Cluster

        sys.path.insert(0, str(Path(__file__).parent))
        os.chdir(Path(__file__).parent)  # the local Ray's workers import sleeping_cohort from the working directory
        torch.set_num_threads(1)
        fitting = [k for k in args.students if _student_processes_fit(k)]
        skipped = [k for k in args.students if k not in fitting]
        cells = []
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=4)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
        try:
            with tempfile.TemporaryDirectory() as scratch:
                for classes in args.classes:
                    for sleep_ms in args.sleep_ms:
                        for students in fitting:
                            engine = engine_cell(students, sleep_ms, classes, cluster.address, Path(scratch))
                            floor = floor_cell(students, sleep_ms, classes)
                            cells.append({"students": students, "sleep_ms": sleep_ms, "classes": classes,
                                          "engine": engine, "floor": floor})
                            print(f"K={students} S={sleep_ms:g} C={classes}: engine {1000 * engine['step_s']:.2f} ms "
                                  f"({engine['efficiency']:.2f}), floor {1000 * floor['step_s']:.2f} ms", flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                       f"torch {torch.__version__}, ray {ray.__version__}",
            "command": " ".join(["python benchmarks/engine_efficiency.py", *sys.argv[1:]]),
            "cells": cells,
            "cores": os.cpu_count(),
            "skipped": (f"K = {', '.join(map(str, skipped))}: a student process holds about 650 MB and the cohort "
                        "would pass 80% of this machine's memory") if skipped else "",
        }
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    results = json.loads(json_path.read_text())
    md_path.write_text(render_markdown(results))
    render_plot(results, png_path)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
