"""A whole run under chaos: random student and coordinator processes SIGKILLed every few seconds, at any phase.

Trains one cohort three times in one Ray session on this machine's CPUs (one torch thread per
student, so the trajectory is deterministic): undisturbed; under ``restart_cohort`` while a
thread SIGKILLs a random process of the cohort (a student or the coordinator) every few seconds,
whatever the driver is doing (steps, evaluation, checkpoint writing, restore) until the last chunk
starts; and the same under
``continue``. It checks that the ``restart_cohort`` run ends with exactly the undisturbed run's
final accuracies, the ``continue`` run close to them, and that every kill is in ``results.json``
(at least one event naming the killed process per kill).

Writes benchmarks/results/chaos_run.{json,md}. Run (10 min on 2 cores, 40 min when they are busy):
    .venv/bin/python benchmarks/chaos_run.py [--seed 0] [--every 3 8] [--epochs 5]
"""

import argparse
import json
import logging
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import ray  # noqa: E402  (must follow the loopback setting)

from rdml_dist.config import parse_config  # noqa: E402
from rdml_dist.engines.ray_engine import train_ray  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONTINUE_TOLERANCE = 0.10  # absolute accuracy: a `continue` student loses the steps since its checkpoint
COORDINATOR = "coordinator"


def experiment(run_dir: Path, epochs: int, policy: str) -> Any:
    return parse_config({
        "name": f"chaos-{policy}",
        "seed": 0,
        "data": {"name": "digits", "val_fraction": 0.2},
        "students": [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}],
        "training": {"epochs": epochs, "batch_size": 128,
                     "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4}},
        "mimicry": {"divergence": "renyi", "alpha": 2.0},
        "runtime": {"engine": "ray", "run_dir": str(run_dir), "torch_threads": 1,
                    "checkpoint": {"every_steps": 4, "keep": 2},
                    "fault": {"on_student_failure": policy, "max_failures": 10_000},
                    "ray": {"placement_timeout_s": 120, "exchange_timeout_s": 60}},
        "monitoring": {"port": 0},
        "rpc": {"port": 0},
    })


class DriverStateLog(logging.Handler):
    """Follows the driver's state from its log records (``driver state: X``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.state = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("driver state: "):
            self.state = message.removeprefix("driver state: ").split(" ", 1)[0]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Chaos:
    """SIGKILLs a random live process of the run every ``every`` seconds (uniform in the range) until it ends."""

    def __init__(self, run_dir: Path, every: tuple[float, float], seed: int, driver: DriverStateLog, last_chunk: int) -> None:
        self.run_dir, self.every, self.driver = run_dir, every, driver
        # Kills stop when the last chunk starts: a process killed after its last call (the final checkpoint
        # written, the run closing) has no call left to meet its death, so no run could report it.
        self.final = run_dir / "checkpoints" / f"step-{last_chunk:08d}" / "manifest.json"
        self.random = random.Random(seed)
        self.kills: list[dict[str, Any]] = []
        self.skipped: dict[str, int] = {}  # picks that found no live process to kill, by reason
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _run(self) -> None:
        wait = self.random.uniform(*self.every)
        while not self.stop.wait(wait):
            wait = 1.0  # until a kill lands; then the next interval
            placements = self.run_dir / "placements.json"
            if self.final.exists() or not placements.exists():
                self._skip("run not started or over")
                continue
            try:
                where = json.loads(placements.read_text())
            except ValueError:
                self._skip("placements.json being rewritten")
                continue
            victims = {name: place["pid"] for name, place in where["students"].items()}
            victims[COORDINATOR] = where["coordinator"]["pid"]
            victim = self.random.choice(sorted(victims))
            pid = victims[victim]
            if not _alive(pid) or self.final.exists():
                self._skip("the process was already replaced")  # Ray is restarting it; placements.json follows
                continue
            wait = self.random.uniform(*self.every)
            state = self.driver.state
            os.kill(pid, signal.SIGKILL)
            self.kills.append({"seconds": round(time.monotonic() - self.started, 1), "victim": victim, "pid": pid,
                               "driver_state": state})

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def train(run_dir: Path, epochs: int, policy: str, chaos: tuple[float, float] | None, seed: int,
          driver: DriverStateLog) -> dict[str, Any]:
    config = experiment(run_dir, epochs, policy)
    steps_per_epoch = 12
    last_chunk = epochs * steps_per_epoch - config.runtime.checkpoint.every_steps
    chaos_thread = Chaos(run_dir, chaos, seed, driver, last_chunk) if chaos else None
    started = time.perf_counter()
    try:
        train_ray(config, run_dir, show_progress=False).finish()
    finally:
        if chaos_thread is not None:
            chaos_thread.close()
    results = json.loads((run_dir / "results.json").read_text())
    final = results["epochs"][-1]
    events = results["faults"]["events"]
    deaths: dict[str, int] = {}
    for event in events:
        if event["kind"] in ("student_died", "coordinator_died"):
            who = event.get("student") or COORDINATOR
            deaths[who] = deaths.get(who, 0) + 1
    kills = chaos_thread.kills if chaos_thread else []
    killed: dict[str, int] = {}
    for kill in kills:
        killed[kill["victim"]] = killed.get(kill["victim"], 0) + 1
    return {
        "policy": policy,
        "seconds": round(time.perf_counter() - started, 1),
        "final_accuracy": {**{name: final["students"][name]["val_accuracy"] for name in final["students"]},
                           "ensemble": final["ensemble_val_accuracy"]},
        "kills": kills,
        "picks_skipped": chaos_thread.skipped if chaos_thread else {},
        "kills_by_victim": killed,
        "death_events_by_process": deaths,
        "fault_counts": results["faults"]["counts"],
        "events": events,
        "every_kill_reported": all(deaths.get(victim, 0) >= count for victim, count in killed.items()),
        "kill_phases": sorted({kill["driver_state"] for kill in kills}),
    }


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        "# Chaos run: SIGKILLs of random cohort processes for a whole run",
        "",
        f"{report['machine']}; {report['epochs']} epochs of 12 steps, students mlp + small_cnn, a kill every "
        f"{report['every'][0]:g}-{report['every'][1]:g} s (seed {report['seed']}). Command: `{report['command']}`",
        "",
        "| run | seconds | kills (students / coordinator) | phases hit | death events | final accuracy mlp / cnn / ensemble | every kill reported |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        students = sum(count for victim, count in run["kills_by_victim"].items() if victim != COORDINATOR)
        accuracy = run["final_accuracy"]
        lines.append(
            f"| {name} | {run['seconds']} | {len(run['kills'])} ({students} / {run['kills_by_victim'].get(COORDINATOR, 0)}) | "
            f"{', '.join(run['kill_phases']) or '-'} | {run['death_events_by_process'] or '-'} | "
            f"{accuracy['mlp']:.4f} / {accuracy['cnn']:.4f} / {accuracy['ensemble']:.4f} | {run['every_kill_reported']} |")
    lines += [
        "",
        f"- `restart_cohort` under chaos ends with exactly the undisturbed final accuracies: **{report['restart_cohort_exact']}**",
        f"- `continue` under chaos within {CONTINUE_TOLERANCE:g} of them: **{report['continue_close']}**",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=float, nargs=2, default=(3.0, 8.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the JSON")
    args = parser.parse_args()
    if args.render_only:
        report = json.loads((RESULTS / "chaos_run.json").read_text())
        (RESULTS / "chaos_run.md").write_text(render(report))
        return 0
    driver = DriverStateLog()
    logger = logging.getLogger("rdml-dist")
    logger.addHandler(driver)
    logger.setLevel(logging.INFO)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            runs = {
                "undisturbed": train(Path(scratch) / "undisturbed", args.epochs, "restart_cohort", None, args.seed, driver),
                "restart_cohort + chaos": train(Path(scratch) / "restart", args.epochs, "restart_cohort", tuple(args.every), args.seed, driver),
                "continue + chaos": train(Path(scratch) / "continue", args.epochs, "continue", tuple(args.every), args.seed + 1, driver),
            }
    finally:
        ray.shutdown()
    reference = runs["undisturbed"]["final_accuracy"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, Ray {ray.__version__}",
        "command": " ".join(["python", *sys.argv]),
        "seed": args.seed, "every": list(args.every), "epochs": args.epochs,
        "runs": runs,
        "restart_cohort_exact": runs["restart_cohort + chaos"]["final_accuracy"] == reference,
        "continue_close": all(abs(value - reference[name]) <= CONTINUE_TOLERANCE
                              for name, value in runs["continue + chaos"]["final_accuracy"].items()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos_run.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "chaos_run.md").write_text(render(report))
    print(render(report))
    ok = report["restart_cohort_exact"] and report["continue_close"] and all(run["every_kill_reported"] for run in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
