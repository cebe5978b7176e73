"""CPU time as Linux's /proc counts it, for the benchmarks that say where a machine's CPU went."""

import os
from pathlib import Path
from typing import NamedTuple

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class MachineTicks(NamedTuple):
    """All cores' time since boot, in ticks (the first line of /proc/stat)."""

    busy: int  # user, nice, system, irq and softirq (guest time is inside user and nice)
    idle: int  # idle and iowait
    steal: int  # time the host gave this machine's cores to others


class ProcessTicks(NamedTuple):
    parent: int
    ticks: int  # user and system time of all its threads
    started: int  # clock ticks after boot: with the pid, names one process even where pids are used again


def machine_ticks() -> MachineTicks:
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return MachineTicks(user + nice + system + irq + softirq, idle + iowait, steal)


def process_ticks() -> dict[int, ProcessTicks]:
    """Each live process's parent and CPU ticks (a process that ends while they are read is left out)."""
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces and parentheses
            processes[int(entry)] = ProcessTicks(int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]))
    return processes


def command_line(pid: int) -> str | None:
    """The process's command line, its arguments separated by spaces ("" for a kernel thread; None once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def inherited_variable(pid: int, name: str) -> str | None:
    """The value of environment variable ``name`` the process started with (None: unset, or the process has ended)."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in environment.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None
