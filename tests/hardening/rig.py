"""What the hardening driver drives: the backends (threads of the driver's process) and the
relay processes (peer.py), each with the bounded waits the driver needs.

Rules kept here:
- A backend reads a connection's 16-byte header, finds its case, and plays the case's
  backend script (actor.py); `outcome` tells whether it saw a case and how its end went.
- A relay process answers one JSON line per command (peer.py); every wait for an answer is
  bounded, and a relay that died or stayed silent raises `RelayGone` with its stderr.
- `stray` and `accept_queue` read what a relay holds and what waits for it to accept.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from tests.hardening.actor import Actor, Outcome
from tests.hardening.scenarios import BACKEND_PORT, BACKENDS, HEADER, MAGIC, SERVING, Case

ROOT = Path(__file__).resolve().parents[2]
DIAL_TIMEOUTS = (1.0, 0.5, 1.0, 2.0)  # the first equals TCP's initial RTO: a lost SYN's retry meets it
CASE_DEADLINE = 30.0


# ---- the backends ----

class Backends:
    """Listeners at the serving backends; each connection names its case in its header."""

    def __init__(self, cases: dict[int, Case]) -> None:
        self.cases = cases
        self.seen: dict[int, Outcome | None] = {}  # None while the backend end still runs
        self.lock = threading.Lock()
        self.listeners = []
        for name in SERVING:
            sock = socket.create_server((BACKENDS[name], BACKEND_PORT), backlog=1024)
            self.listeners.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CASE_DEADLINE)
        raw = b""
        try:
            while len(raw) < HEADER.size:
                chunk = conn.recv(HEADER.size - len(raw))
                if not chunk:
                    break
                raw += chunk
        except OSError:
            pass
        case = None
        if len(raw) == HEADER.size:
            magic, case_id = HEADER.unpack(raw)
            case = self.cases.get(case_id) if magic == MAGIC else None
        if case is None:  # a stray connection, or its client reset before the header came whole
            conn.close()
            return
        with self.lock:
            self.seen[case.id] = None
        size, pause = case.backend_read
        outcome = Actor(conn, list(case.backend), time.monotonic() + CASE_DEADLINE, size, pause).run()
        with self.lock:
            self.seen[case.id] = outcome

    def outcome(self, case_id: int, wait: float) -> tuple[bool, Outcome | None]:
        """(seen, its outcome once the backend end finished, waiting up to `wait`)."""
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                seen = case_id in self.seen
                outcome = self.seen.get(case_id)
            if not seen or outcome is not None or time.monotonic() >= deadline:
                return seen, outcome
            time.sleep(0.01)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()


# ---- the relay processes ----

class RelayProcess:
    def __init__(self, args: argparse.Namespace, generation: int, workdir: Path) -> None:
        self.generation = generation
        self.port = 7000 + generation
        self.inbox = str(workdir / f"inbox{generation}.sock")
        self.lines: queue.Queue[str] = queue.Queue()
        self.connecting = 0  # cases that chose this relay and have not connected yet
        self.squeezed = False
        self.quiet: list[dict[str, Any]] = []
        self.served = 0
        argv = [sys.executable, "-m", "tests.hardening.peer", "--relay", args.relay, "--loop", args.loop,
                "--port", str(self.port), "--inbox", self.inbox,
                "--dial-timeouts", ",".join(str(t) for t in DIAL_TIMEOUTS)]
        if "stall" in args.conditions:
            argv += ["--stall", str(args.seed * 1000 + generation)]
        if "sigpipe" in args.conditions and args.relay == "engine":
            argv.append("--sigpipe-default")
        env = dict(os.environ, PYPROXY_LEAK_CHECK="1")
        if env.get("PYPROXY_SANITIZED") == "1":  # freed memory held for use-after-free checks: bounded
            env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=32"
        self.stderr_path = workdir / f"relay{generation}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.ready = self.expect("ready", 60)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == "":
                self.lines.put("")
                break
            name, _, body = line.partition(" ")
            if name == tag:
                return dict(json.loads(body))
        raise RelayGone(f"relay {self.generation}: no '{tag}' answer (exit code {self.proc.poll()}); "
                        f"stderr: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def complaints(self) -> str:
        """What the relay printed that only a bug prints: a traceback, an exception the
        engine could not raise (PyErr_WriteUnraisable), a sanitizer's line."""
        text = self.stderr_tail() if self.stderr_path.exists() else ""
        marks = ("Traceback", "Exception ignored", "ERROR:", "runtime error")
        return text if any(mark in text for mark in marks) else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class RelayGone(RuntimeError):
    pass


def stray(relay: RelayProcess, seen: dict[str, Any]) -> bool:
    """Pairs, TCP sockets (listeners aside) or pipes (past those the process had before any
    connection: the event loop's own) still open."""
    return bool(seen["pairs"] or seen["tcp"] or seen["pipes"] > relay.ready["pipes"])


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of this namespace's listener on `port`."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return 0
