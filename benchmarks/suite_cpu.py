"""Where the test suite's CPU goes: every process on the machine, by kind and by the test that started it.

The README's test command runs three pytest-xdist workers on two cores and keeps the machine busy, so its wall
time follows the CPU its processes spend. This runs that command (or the one given after ``--``) and reads
/proc every quarter second: each process's CPU time, its command line, and the ``PYTEST_CURRENT_TEST`` it
inherited (pytest sets it while a test runs, so a Ray started by a test, the actors its raylet starts and the
``rdml-dist`` drivers it runs carry that test's name; a module's shared Ray carries its first test's). A process
that lives less than a quarter second may be missed, and one is counted up to its last reading.

Writes benchmarks/results/suite_cpu.{json,md}. Run (the suite's time, about 11 min on 2 cores):
    .venv/bin/python benchmarks/suite_cpu.py
    .venv/bin/python benchmarks/suite_cpu.py -- .venv/bin/python -m pytest tests/integration/test_failure_paths.py
"""

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from proc_cpu import TICKS_PER_S, command_line, inherited_variable, machine_ticks, process_ticks  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SAMPLE_S = 0.25
README_COMMAND = [".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def process_kind(command: str) -> str:
    """What a process is, from its command line (a Ray worker renames itself ``ray::<actor or task>``)."""
    if command.startswith("ray::"):
        name = command.split()[0].split(".")[0].removeprefix("ray::")
        if name in ("DashboardAgent", "RuntimeEnvAgent"):
            return "Ray daemon: " + name
        return "Ray worker: " + ("idle" if name == "IDLE" else name)
    for marker, kind in (("default_worker.py", "Ray worker: starting"), ("/raylet", "Ray daemon: raylet"),
                         ("gcs_server", "Ray daemon: GCS"), ("dashboard", "Ray daemon: dashboard"),
                         ("log_monitor", "Ray daemon: log monitor"), ("monitor.py", "Ray daemon: autoscaler monitor"),
                         ("runtime_env", "Ray daemon: runtime env agent"), ("bin/rdml-dist", "rdml-dist driver"),
                         ("-m rdml_dist", "rdml-dist driver"), ("exec(eval(sys.stdin.readline()))", "pytest worker"),
                         ("pytest", "pytest"),
                         ("prometheus", "Prometheus")):
        if marker in command:
            return kind
    return "other"


class Watch:
    """Each process seen while the command runs: its kind, the test it inherited and its CPU at the last reading."""

    def __init__(self) -> None:
        self.processes: dict[tuple[int, int], dict[str, Any]] = {}
        self.before = {(pid, process.started): process.ticks for pid, process in process_ticks().items()}

    def read(self) -> None:
        for pid, process in process_ticks().items():
            key = (pid, process.started)
            seen = self.processes.get(key)
            if seen is None:
                command = command_line(pid)
                if command is None:
                    continue
                seen = self.processes[key] = {"kind": process_kind(command), "ticks_at_start": self.before.get(key, 0),
                                              "test": inherited_variable(pid, "PYTEST_CURRENT_TEST")}
            elif seen["kind"] in ("Ray worker: starting", "Ray worker: idle"):  # a worker names itself once it has work
                command = command_line(pid)
                if command is not None and command.startswith("ray::") and not command.startswith("ray::IDLE"):
                    seen["kind"] = process_kind(command)
            seen["ticks"] = process.ticks

    def by(self, field: str) -> list[tuple[str, float, int]]:
        cpu: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        for seen in self.processes.values():
            key = seen[field] if field == "kind" else _test_module(seen["test"])
            cpu[key] += (seen["ticks"] - seen["ticks_at_start"]) / TICKS_PER_S
            count[key] += 1
        return [(key, seconds, count[key]) for key, seconds in cpu.most_common()]


def _test_module(test: str | None) -> str:
    """The test's module (``None``: no test was running when the process's ancestor started)."""
    return "(no test)" if test is None else test.split("::")[0]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Where the test suite's CPU goes (benchmarks/suite_cpu.py)", "",
        f"Machine: {report['machine']}. Command: `{' '.join(report['command'])}` (exit {report['exit_code']}).", "",
        f"Wall {report['wall_s']:.0f} s; the machine's busy CPU {report['machine_busy_s']:.0f} s of "
        f"{report['machine_total_s']:.0f} s ({100 * report['machine_busy_s'] / report['machine_total_s']:.0f}% busy); "
        f"the processes seen {report['processes_cpu_s']:.0f} s.", "",
        "## By kind of process", "", "| kind | processes | CPU s | CPU s each |", "|---|---|---|---|",
        *[f"| {kind} | {count} | {seconds:.0f} | {seconds / count:.2f} |" for kind, seconds, count in report["by_kind"] if seconds >= 1],
        "", "## By the test module that started them (a module's shared Ray counts for it)", "",
        "| test module | processes | CPU s |", "|---|---|---|",
        *[f"| {module} | {count} | {seconds:.0f} |" for module, seconds, count in report["by_test_module"] if seconds >= 1],
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="*", help="the command to run (after --); the README's test command by default")
    command = parser.parse_args().command or README_COMMAND
    watch = Watch()
    machine_before, started = machine_ticks(), time.perf_counter()
    child = subprocess.Popen(command)
    while child.poll() is None:
        watch.read()
        time.sleep(SAMPLE_S)
    watch.read()
    machine_after = machine_ticks()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "command": command, "exit_code": child.returncode, "wall_s": time.perf_counter() - started,
        "machine_busy_s": (machine_after.busy - machine_before.busy) / TICKS_PER_S,
        "machine_total_s": (sum(machine_after) - sum(machine_before)) / TICKS_PER_S,
        "processes_cpu_s": sum(seconds for _, seconds, _ in watch.by("kind")),
        "by_kind": watch.by("kind"), "by_test_module": watch.by("test"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "suite_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (RESULTS / "suite_cpu.md").write_text(markdown)
    print(markdown)
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
