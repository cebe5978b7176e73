"""Run ``rdml-dist`` as a real child process, the way a user does, with every Ray process on loopback."""

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

RDML_DIST = [str(Path(sys.executable).parent / "rdml-dist")]
REPOSITORY = Path(__file__).resolve().parents[2]


def child_environment(**extra: str) -> dict[str, str]:
    """The test's environment without a cluster address, on loopback, no usage statistics."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    environment.update(extra)
    return environment


def write_config(path: Path, run_dir: Path, **sections: Any) -> Path:
    """A two-student digits experiment (one epoch, one torch thread each) written as YAML to ``path``."""
    raw: dict[str, Any] = {
        "name": "cli",
        "seed": 0,
        "data": {"name": "digits"},
        "students": [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}],
        "training": {"epochs": 1, "batch_size": 256, "optimizer": {"lr": 0.05}, "last_epochs_reported": 1},
        "runtime": {"engine": "ray", "run_dir": str(run_dir), "torch_threads": 1},
        "monitoring": {"port": 0},
        "rpc": {"port": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(args: list[str], cwd: Path, timeout_s: float, **environment: str) -> subprocess.CompletedProcess[str]:
    """Run ``rdml-dist ARGS`` to completion (killed, with its process group, after ``timeout_s``)."""
    process = subprocess.Popen(
        [*RDML_DIST, *args], cwd=cwd, env=child_environment(**environment), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"rdml-dist {' '.join(args)} did not finish within {timeout_s} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    return free_ports(1)[0]


def _fixed_port_range() -> range:
    """Ports that no process is handed by chance: above Ray's worker ports (10002-19999 by default) and below the
    kernel's ephemeral range, from which every bind to port 0 and every outgoing connection takes one. A port chosen
    there (as binding port 0 would) can be taken by one of Ray's many servers or connections before the test's own
    process binds it; seen: an external student's fixed ``rpc.port`` answered by a Ray server's gRPC."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if ephemeral_low <= 21000:
        raise RuntimeError(f"the kernel's ephemeral ports start at {ephemeral_low}: no fixed range is left for the tests")
    return range(20000, ephemeral_low)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on loopback that nothing is bound to right now, drawn at random from
    :func:`_fixed_port_range` by the system's randomness (tests side by side usually draw apart, whatever a test
    seeds ``random`` with): held together while they are chosen."""
    candidates = _fixed_port_range()
    with contextlib.ExitStack() as held:
        chosen: list[int] = []
        for port in random.SystemRandom().sample(candidates, 200):
            probe = held.enter_context(socket.socket())
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free ports among 200 drawn from {candidates}")


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``, not followed by another digit (read from /proc).

    ``127.0.0.1:4321`` must not find the processes of another Ray at ``127.0.0.1:43210`` (tests run side by side).
    """
    pattern = re.compile(re.escape(text) + r"(?!\d)")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern.search(command_line):
            found.append(int(entry.name))
    return found


def kill_actor_process(pid: int, actor_class: str) -> bool:
    """SIGKILL ``pid`` if it still is a Ray actor process of ``actor_class``; whether it was killed.

    A pid read from ``placements.json`` may belong to another process once its actor has exited: on a busy
    machine (tests side by side, every thread taking a pid) the 32768 pids wrap around within minutes.
    """
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if f"ray::{actor_class}" not in command_line:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
