"""Per-step cost of the exchange with the coordinator split into S row shards, same machine, same run.

K sender Ray actors (stand-in students with no model: fixed B×C float32 logits, 0.1 CPU and one
torch thread each) exchange in lock-step with S ``CoordinatorActor`` shards over their frame
lanes, exactly as Ray student actors do (``ShardLanes``: every frame split by rows, sent to all
shards side by side, the replies joined). Each shard is an actor of its own (one torch thread),
so with S shards S processes compute a step's mimicry gradients at once; each holds one CPU, as
``runtime.coordinator.cpus: 1`` gives it.

For each K, a coordinator set is started for every S; after warm-up steps the measured steps run
in chunks that alternate between the S values (1, 2, …, then back), so slow drifts of the
machine fall on all alike; the first step of each chunk is a lead-in and is not counted. The
per-step time is the lock-step span (last reply received minus first frame sent over the K
senders, CLOCK_MONOTONIC); the tables give its median, and the median of the slowest shard's own
computation time (``coordinator_seconds`` of the joined step records). The first step's
gradients of every S are compared with S = 1 (the same exact computation, split by rows).

The senders themselves compute nothing, so on a 2-core machine two shards can each have a core:
the numbers show what splitting the computation buys once it, not the students, is the bottleneck.

Writes benchmarks/results/coordinator_shards.{json,md,png}. Run (2 cores; full: about 4 minutes,
--quick: about 1.5 minutes):
    .venv/bin/python benchmarks/coordinator_shards.py [--quick]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from rdml_dist.config import parse_config  # noqa: E402
from rdml_dist.data import batch_plan, indices_hash  # noqa: E402
from rdml_dist.engines.ray_actors import CoordinatorActor  # noqa: E402
from rdml_dist.messages import LogitsFrame, StudentInfo  # noqa: E402
from rdml_dist.lane.handshake import student_key  # noqa: E402
from rdml_dist.lane.client import ShardLanes  # noqa: E402
from rdml_dist.coordinator_core.shards import merge_records  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LANE_SECRET = "benchmark"
MODES = {
    "full": {"students": (4, 8), "batch": 256, "classes": 1000, "shards": (1, 2), "warmup": 3, "chunks": 6, "chunk_steps": 8},
    "quick": {"students": (4,), "batch": 256, "classes": 1000, "shards": (1, 2), "warmup": 2, "chunks": 2, "chunk_steps": 5},
}


def now() -> float:
    """CLOCK_MONOTONIC: one time base for every process on the machine, so senders' stamps compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@ray.remote(num_cpus=0.1)
class ShardedSender:
    """A stand-in student with no model: sends fixed logits each step to every shard, stamps each exchange."""

    def __init__(self, name: str, hashes: list[str], batch: int, classes: int) -> None:
        torch.set_num_threads(1)
        self.name, self.hashes = name, hashes
        self.logits = torch.randn(batch, classes, generator=torch.Generator().manual_seed(sum(map(ord, name))))
        self.lanes: dict[int, ShardLanes] = {}

    def connect(self, shards: int, addresses: list[str]) -> None:
        self.lanes[shards] = ShardLanes(addresses, student_key(LANE_SECRET, self.name), self.name, 60.0, 1 << 28)

    def run(self, shards: int, start: int, end: int) -> dict[str, Any]:
        """Steps ``[start, end)`` against the ``shards``-shard coordinator set."""
        sent_at, received_at, first_grad = [], [], None
        for step in range(start, end):
            frame = LogitsFrame(self.name, step, self.hashes[step], self.logits, ce_loss=1.0, correct=0, labelled=1, correct_clean=0)
            sent_at.append(now())
            reply = self.lanes[shards].exchange(frame)
            received_at.append(now())
            if reply.step != step or tuple(reply.grad.shape) != tuple(self.logits.shape):
                raise RuntimeError(f"{self.name}: step {step} answered with step {reply.step}, grad {tuple(reply.grad.shape)}")
            if first_grad is None:
                first_grad = reply.grad
        return {"sent": sent_at, "received": received_at, "first_grad": first_grad}

    def close(self) -> None:
        for lanes in self.lanes.values():
            lanes.close()


def measure(students: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every S for one K: coordinator sets side by side, warm-up, then alternating measured chunks."""
    batch, classes, shard_counts = settings["batch"], settings["classes"], settings["shards"]
    planned = settings["warmup"] + settings["chunks"] * (settings["chunk_steps"] + 1)
    names = [f"s{index}" for index in range(students)]
    hashes = [indices_hash(indices) for indices in batch_plan(batch * planned, batch, 0, 0)]
    infos = [StudentInfo(name, batch * planned, 1, classes, planned) for name in names]
    senders = [ShardedSender.remote(name, hashes, batch, classes) for name in names]
    sets: dict[int, list[Any]] = {}
    try:
        for shards in shard_counts:
            config = parse_config({"students": [{"model": "mlp", "name": name} for name in names],
                                   "training": {"batch_size": batch, "epochs": 1},
                                   "runtime": {"coordinator": {"shards": shards}}})
            sets[shards] = [  # one CPU each, as runtime.coordinator.cpus gives them: Ray then sets one torch thread
                CoordinatorActor.options(num_cpus=1).remote(config.model_dump(mode="json"), index) for index in range(shards)
            ]
            ray.get([shard.register.remote(info) for shard in sets[shards] for info in infos])
            addresses = ray.get([shard.serve_lane.remote(LANE_SECRET) for shard in sets[shards]])
            ray.get([sender.connect.remote(shards, addresses) for sender in senders])
        steps = dict.fromkeys(shard_counts, 0)
        spans: dict[int, list[float]] = {shards: [] for shards in shard_counts}
        measured: dict[int, set[int]] = {shards: set() for shards in shard_counts}
        first_grads: dict[int, list[torch.Tensor]] = {}

        def run(shards: int, count: int) -> list[dict[str, Any]]:
            runs = ray.get([sender.run.remote(shards, steps[shards], steps[shards] + count) for sender in senders])
            if steps[shards] == 0:
                first_grads[shards] = [result["first_grad"] for result in runs]
            steps[shards] += count
            return runs

        for shards in shard_counts:
            run(shards, settings["warmup"])
        for chunk in range(settings["chunks"]):
            for shards in shard_counts if chunk % 2 == 0 else shard_counts[::-1]:
                first = steps[shards]
                runs = run(shards, settings["chunk_steps"] + 1)
                for offset in range(1, settings["chunk_steps"] + 1):  # offset 0 is the chunk's lead-in
                    spans[shards].append(max(r["received"][offset] for r in runs) - min(r["sent"][offset] for r in runs))
                    measured[shards].add(first + offset)
        rows = []
        for shards in shard_counts:
            records = merge_records(ray.get([shard.pop_records.remote(steps[shards]) for shard in sets[shards]]))
            compute = [record.coordinator_seconds for record in records if record.step in measured[shards] and record.student == names[0]]
            difference = max(float((grad - reference).abs().max()) for grad, reference in zip(first_grads[shards], first_grads[shard_counts[0]]))
            rows.append({"students": students, "batch": batch, "classes": classes, "shards": shards,
                         "measured_steps": len(spans[shards]), "median_span_seconds": statistics.median(spans[shards]),
                         "median_slowest_shard_compute_seconds": statistics.median(compute),
                         "max_grad_difference_from_one_shard": difference})
        return rows
    finally:
        ray.get([sender.close.remote() for sender in senders])
        for shard_set in sets.values():
            for shard in shard_set:
                ray.kill(shard)
        for sender in senders:
            ray.kill(sender)


def render(results: dict[str, Any]) -> str:
    lines = [
        f"# Coordinator shards ({results['mode']} mode, benchmarks/coordinator_shards.py)",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. K stand-in students (no model) exchange "
        f"B×C = {results['rows'][0]['batch']}×{results['rows'][0]['classes']} float32 logits in lock-step with S coordinator "
        "shards over their frame lanes; S values alternate chunk by chunk. Span: last reply minus first frame sent, per step "
        "(median); compute: the slowest shard's own computation of the step (median).",
        "",
        "| K | S | per-step span (ms) | span vs S=1 | slowest shard's compute (ms) | max grad difference from S=1 |",
        "|---|---|---|---|---|---|",
    ]
    first = {row["students"]: row["median_span_seconds"] for row in results["rows"] if row["shards"] == 1}
    for row in results["rows"]:
        lines.append(f"| {row['students']} | {row['shards']} | {row['median_span_seconds'] * 1e3:.1f} | "
                     f"{row['median_span_seconds'] / first[row['students']]:.2f}× | "
                     f"{row['median_slowest_shard_compute_seconds'] * 1e3:.1f} | {row['max_grad_difference_from_one_shard']:.1e} |")
    lines += ["", "Plot: `coordinator_shards.png`.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for students in sorted({row["students"] for row in results["rows"]}):
        rows = [row for row in results["rows"] if row["students"] == students]
        axis.plot([row["shards"] for row in rows], [row["median_span_seconds"] * 1e3 for row in rows], marker="o", label=f"K = {students}")
    axis.set_xlabel("coordinator shards S")
    axis.set_ylabel("per-step span (ms)")
    axis.set_xticks(sorted({row["shards"] for row in results["rows"]}))
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_title(f"B×C = {results['rows'][0]['batch']}×{results['rows'][0]['classes']}, lock-step exchange")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one K, fewer steps (about 1.5 minutes)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
    try:
        rows = [row for students in settings["students"] for row in measure(students, settings)]
    finally:
        ray.shutdown()
    results = {
        "mode": mode,
        "command": ".venv/bin/python benchmarks/coordinator_shards.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, Python {sys.version.split()[0]}, torch {torch.__version__}",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coordinator_shards.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "coordinator_shards.md").write_text(render(results))
    plot(results, RESULTS / "coordinator_shards.png")
    print(render(results))


if __name__ == "__main__":
    main()
