"""Forking and supervising `--workers N` (the data plane's side is dataplane/workers.py).

Rules kept here:
- The supervisor (the process `pyproxy` was started as) asks first whether a running
  group hands over (`predecessor_hands_over`); if not, it makes the N listeners of one
  reuseport group. Then it forks N workers *before any event loop exists*; worker i keeps
  socket i and closes the others, and serves as a single proxy would.
- It forwards SIGTERM/SIGINT to the workers (each drains as a single proxy would); when any
  worker fails, it stops the others and exits with the first failure's status. A worker
  that exits with 0 unasked has handed its socket to its counterpart in a successor group:
  the reuseport group is intact, so the others are left to finish their own hand-over.
- Workers still there `STOP_GRACE` seconds after the first request to stop are killed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from pyproxy.config import ProxyConfig, node_name_of
from pyproxy.dataplane.workers import WorkerRole, reuseport_listeners
from pyproxy.lifecycle.channel import Channel
from pyproxy.lifecycle.handover import identity_of, socket_path, take_over

log = logging.getLogger("pyproxy.workers")

STOP_GRACE = 60.0  # seconds the supervisor waits for workers after asking them to stop


def predecessor_hands_over(config: ProxyConfig) -> bool:
    """Does a running group hand over to this one? A group that refuses (another protocol
    version) is waited for until it has gone (it releases on SIGTERM)."""
    path = socket_path(config.lifecycle.stateDir, 0)
    mine = identity_of(config, node_name_of(config), 0, config.dataplane.workers, probe=True)
    outcome = take_over(path, mine, config.lifecycle.handOverTimeout)
    if outcome.refused is None:
        return outcome.found
    while True:  # bounded by the running group's own drain bound
        try:
            Channel.connect(path, 1.0).close()
        except OSError:
            return False
        time.sleep(0.2)


def run_workers(count: int, host: str, port: int, serve: Callable[[WorkerRole], int],
                predecessor: Callable[[], bool] = lambda: False) -> int:
    """Fork `count` workers running `serve(role)`; supervise them; return the exit status.
    When `predecessor()` says a running group hands over, no socket is made here: each
    worker takes its listener over from its counterpart (pyproxy/lifecycle)."""
    socks = [] if predecessor() else reuseport_listeners(host, port, count)
    children: dict[int, int] = {}
    group = os.getpid()
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            for j, sock in enumerate(socks):
                if j != index:
                    sock.close()
            status = 1
            try:
                status = serve(WorkerRole(index, count, socks[index] if socks else None, group))
            except BaseException:  # never unwind into the supervisor's code in a worker
                log.exception("worker %d failed", index)
            finally:
                os._exit(status)
        children[pid] = index
    for sock in socks:
        sock.close()
    log.info("started %d workers: %s", count, ", ".join(str(p) for p in children))
    return _supervise(children)


def _supervise(children: dict[int, int]) -> int:
    state = {"asked_at": 0.0}  # when the workers were first asked to stop (0: not yet)

    def forward(signum: int, frame: FrameType | None) -> None:
        state["asked_at"] = state["asked_at"] or time.monotonic()
        for pid in children:
            _kill(pid, signum)  # a second signal reaches them too: they stop without draining

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = 0
    while children:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if state["asked_at"] and time.monotonic() - state["asked_at"] > STOP_GRACE:
                for other in children:
                    _kill(other, signal.SIGKILL)
            time.sleep(0.1)
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        log.info("worker %d (pid %d) exited with %d", index, pid, code)
        if code != 0 and status == 0:
            status = code if code > 0 else 1
        if code == 0 and not state["asked_at"]:  # it handed its socket over: the group is intact
            continue
        if not state["asked_at"] and children:  # one gone: the group is renumbered, so stop them all
            state["asked_at"] = time.monotonic()
            for other in children:
                _kill(other, signal.SIGTERM)
    return status


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
