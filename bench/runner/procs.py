"""Processes the runner starts, and what /proc says about them.

Rules kept here:
- Every process is started in a new session (its own process group) and registered; the
  runner stops exactly the groups it started: SIGTERM, a bounded wait, then SIGKILL. Nothing
  is ever killed by name.
- CPU of a contender = utime + stime + cutime + cstime summed over its process tree (the
  root and its live descendants): a dead child's time sits in the cutime of whoever reaped
  it, and a live one's in its own stat, so each CPU second is counted once.
- Memory of a contender = the sum of Pss over the tree (shared pages split between sharers,
  which matters for socat's forks and nginx's workers).
- Parsing /proc text is pure (`parse_stat`); reading it tolerates processes that vanish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    comm: str = ""


def parse_stat(text: str) -> Stat:
    """Parse /proc/PID/stat (the command may hold spaces and parentheses)."""
    head, _, rest = text.rpartition(")")
    pid_text, _, comm = head.partition("(")
    fields = rest.split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17
    return Stat(pid=int(pid_text), ppid=int(fields[1]), cpu_ticks=sum(int(f) for f in fields[11:15]), comm=comm)


def _read_stat(pid: int) -> Stat | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def tree(root: int) -> list[Stat]:
    """The root and its live descendants."""
    stats = [s for s in (_read_stat(int(p)) for p in os.listdir("/proc") if p.isdigit()) if s]
    children: dict[int, list[Stat]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    me = next((s for s in stats if s.pid == root), None)
    if me is None:
        return []
    out, todo = [me], [me.pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def cpu_seconds(root: int) -> float:
    return sum(s.cpu_ticks for s in tree(root)) / CLK_TCK


def parse_machine_busy(text: str) -> int:
    """/proc/stat -> the machine's busy ticks, all CPUs: user, nice, system, irq, softirq and
    steal (not idle or iowait; guest time is already inside user)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
            return user + nice + system + irq + softirq + steal
    raise ValueError("/proc/stat has no 'cpu' line")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, interrupts and softirq)."""
    return parse_machine_busy(Path("/proc/stat").read_text()) / CLK_TCK


def cpu_by_process(root: int) -> dict[str, float]:
    """CPU seconds per process of the tree, keyed "pid comm"."""
    return {f"{s.pid} {s.comm}": s.cpu_ticks / CLK_TCK for s in tree(root)}


def busiest_deltas(before: dict[str, float], after: dict[str, float], top: int = 8) -> dict[str, float]:
    """Per-process CPU used between two samples (new processes count from 0), the busiest `top`."""
    deltas = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(deltas.items(), key=lambda kv: -kv[1])[:top])


def parse_pss_kib(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def pss_bytes(root: int) -> int:
    total = 0
    for s in tree(root):
        try:
            total += parse_pss_kib(Path(f"/proc/{s.pid}/smaps_rollup").read_text()) * 1024
        except OSError:
            continue
    return total


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Registry:
    """The processes this run started; `stop_all` ends them, and only them."""

    def __init__(self) -> None:
        self.started: list[Started] = []

    def start(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None,
              env: dict[str, str] | None = None, stdout: Path | None = None) -> Started:
        """Start argv in a session of its own; stderr (and stdout, unless given) go to `log`."""
        with open(log, "ab") as err, open(stdout or log, "ab") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     cwd=cwd, env=env, start_new_session=True)
        proc = Started(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Started, grace: float = 3.0) -> None:
        if proc.alive():
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            again = time.monotonic() + 0.1  # pyproxy serves on after one SIGTERM, leaves at a second
            while proc.alive() and time.monotonic() < deadline:
                if again and time.monotonic() > again:
                    _signal_group(proc.pid, signal.SIGTERM)
                    again = 0.0
                time.sleep(0.05)
        _signal_group(proc.pid, signal.SIGKILL)  # also catches leftovers of the group
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def kill_pid(pid: int) -> None:
    """SIGKILL to one process of a group this run started (a crash of pyproxy's serving process)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(pgid: int) -> None:
    """SIGKILL to a process group this run started (a crash of a contender)."""
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
