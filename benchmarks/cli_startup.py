"""How fast the command line answers: ``rdml-dist status --help``, ``validate --help``, and ``status`` against a live cohort.

Each command runs in a fresh process (the console script of this interpreter's environment), as a
user runs it; the median over ``--runs`` is reported. Beside them, in the same rounds: a bare
interpreter (the floor) and ``import torch`` (what a command that loaded torch would pay at least).
With ``--live`` (the default) the benchmark starts a real cohort, ``rdml-dist train`` of the embedded
default on a local Ray, waits until it trains, and times ``rdml-dist status --coordinator ADDRESS``
against it. Writes benchmarks/results/cli_startup.json and .md.
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RDML_DIST = str(Path(sys.executable).with_name("rdml-dist"))
RPC_LINE = re.compile(r"rdml-dist INFO cohort service \(gRPC\) at (\S+)")
LIMITS_S = {"rdml-dist status --help": 1.0, "rdml-dist validate --help": 1.0, "rdml-dist status (live cohort)": 2.0}


def _environment() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _seconds(command: list[str]) -> float:
    """Wall time of one run of ``command`` in a fresh process; it must succeed."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return elapsed


@contextmanager
def live_cohort(epochs: int, workdir: Path, ready_timeout_s: float = 300) -> Iterator[str]:
    """A real ``rdml-dist train`` of the embedded default on a local Ray; yields its cohort service address once
    ``rdml-dist status`` shows it training; the whole process group is stopped afterwards."""
    command = [RDML_DIST, "train", "--no-progress", "--overwrite", "--run-dir", str(workdir / "run"),
               "--set", f"training.epochs={epochs}", "--set", "rpc.port=0", "--set", "monitoring.port=0",
               "--set", "runtime.torch_threads=1"]
    log = (workdir / "driver.log").open("w+")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=_environment(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        address = None
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            if address is None and (found := RPC_LINE.search((workdir / "driver.log").read_text())):
                address = found.group(1)
            if address is not None:
                shown = subprocess.run([RDML_DIST, "status", "--coordinator", address], capture_output=True, text=True,
                                       env=_environment(), timeout=60)
                if shown.returncode == 0 and ": training," in shown.stdout:
                    yield address
                    return
        raise RuntimeError(f"the cohort did not start training within {ready_timeout_s} s:\n"
                           f"{(workdir / 'driver.log').read_text()[-3000:]}")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGINT)  # the driver shuts its local Ray down
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        log.close()


def measure(runs: int, commands: dict[str, list[str]]) -> dict[str, list[float]]:
    """Every command once per round, ``runs`` rounds after one warm-up round (the file cache)."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_index in range(runs + 1):
        for name, command in commands.items():
            seconds = _seconds(command)
            if round_index:
                times[name].append(seconds)
    return times


def summarise(times: dict[str, list[float]]) -> list[dict[str, object]]:
    torch_median = statistics.median(times["python -c 'import torch' (reference)"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({
            "command": name, "runs": len(values), "median_s": round(median, 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3), "ratio_to_import_torch": round(median / torch_median, 2),
            "limit_s": LIMITS_S.get(name), "within_limit": None if name not in LIMITS_S else median < LIMITS_S[name],
        })
    return rows


def render(rows: list[dict[str, object]], context: dict[str, object]) -> str:
    lines = [
        "# CLI start-up",
        "",
        f"`{context['command']}` on {context['machine']} (Python {context['python']}), {context['runs']} runs each, "
        "every command in a fresh process, all commands interleaved round by round. The live cohort: "
        f"{context['cohort']}. The machine's 1-minute load average before and after: "
        f"{context['load_average_1min'][0]} and {context['load_average_1min'][1]} (other work shared its cores).",
        "",
        "| command | median s | min s | max s | × `import torch` | limit s | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        limit = "–" if row["limit_s"] is None else f"{row['limit_s']:g}"
        within = "–" if row["within_limit"] is None else ("yes" if row["within_limit"] else "**no**")
        lines.append(f"| `{row['command']}` | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['max_s']:.3f} | "
                     f"{row['ratio_to_import_torch']:.2f} | {limit} | {within} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-live", dest="live", action="store_false", help="skip the live cohort (no Ray run)")
    parser.add_argument("--epochs", type=int, default=200, help="epochs of the live cohort (stopped once measured)")
    args = parser.parse_args()
    commands = {
        "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
        "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
        "rdml-dist status --help": [RDML_DIST, "status", "--help"],
        "rdml-dist validate --help": [RDML_DIST, "validate", "--help"],
    }
    cohort = "not measured (--no-live)"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        if args.live:
            with live_cohort(args.epochs, Path(directory)) as address:
                commands["rdml-dist status (live cohort)"] = [RDML_DIST, "status", "--coordinator", address]
                times = measure(args.runs, commands)
            cohort = "`rdml-dist train` of the embedded default (3 students) on a local Ray, training while measured"
        else:
            times = measure(args.runs, commands)
    rows = summarise(times)
    context = {
        "command": "python benchmarks/cli_startup.py" + ("" if args.live else " --no-live") + f" --runs {args.runs}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "runs": args.runs, "cohort": cohort,
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_startup.json").write_text(json.dumps({"context": context, "rows": rows, "times_s": times}, indent=2) + "\n")
    report = render(rows, context)
    (RESULTS / "cli_startup.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
