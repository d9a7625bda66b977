"""`python -m bench.restart`: what a restart of the proxy costs its clients.

Rules kept here:
- Run in the client namespace while the harness restarts the contender (`Harness.measure_restart`):
  `--held K` connections are opened first and kept (`R` mode, one exchange proves each);
  then new connections, one `R` exchange each, back to back from `--conns` threads, until
  `--stop-file` exists (the harness is done restarting) or `--duration` passes. At the end
  every held connection must carry one more exchange.
- Figures: `attempts` and `failed` (new connections that did not complete an exchange within
  `--timeout`), `gap_ms` (the longest time without a completed exchange: time without service),
  `held_lost` (held connections that no longer work: established connections lost).
- A new connection that waits in an accept queue and is answered late is slow, not failed;
  one whose SYN is dropped fails after `--timeout` (shorter than the SYN retransmission).
- Plain blocking sockets and threads; every loop is bounded by the duration and a count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

from bench.loadtool import protocol as proto

MAX_ATTEMPTS = 200_000


def exchange(sock: socket.socket) -> None:
    sock.sendall(b"?")
    if sock.recv(1) != b"x":
        raise ConnectionError("no answer")


def open_held(target: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(target, timeout=timeout)
    sock.sendall(proto.rr(1, 1).pack())
    exchange(sock)
    return sock


class Loop:
    def __init__(self, target: tuple[str, int], timeout: float, until: float, stop_file: str | None) -> None:
        self.target = target
        self.timeout = timeout
        self.until = until
        self.stop_file = stop_file
        self.lock = threading.Lock()
        self.attempts = self.failed = 0
        self.last_answer = time.monotonic()
        self.gap = 0.0
        self.errors: dict[str, int] = {}

    def run(self) -> None:
        while time.monotonic() < self.until and not (self.stop_file and os.path.exists(self.stop_file)):
            with self.lock:
                if self.attempts >= MAX_ATTEMPTS:
                    return
                self.attempts += 1
            try:
                with socket.create_connection(self.target, timeout=self.timeout) as sock:
                    sock.sendall(proto.rr(1, 1).pack())
                    exchange(sock)
            except OSError as exc:
                with self.lock:
                    self.failed += 1
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                continue
            done = time.monotonic()
            with self.lock:
                self.gap = max(self.gap, done - self.last_answer)
                self.last_answer = max(self.last_answer, done)


def measure(target: tuple[str, int], duration: float, conns: int, held: int, timeout: float,
            stop_file: str | None = None) -> dict[str, object]:
    kept = [open_held(target, 5.0) for _ in range(held)]
    if stop_file:
        with open(stop_file + ".ready", "w"):  # the harness restarts only once these are held
            pass
    loop = Loop(target, timeout, time.monotonic() + duration, stop_file)
    threads = [threading.Thread(target=loop.run, daemon=True) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    lost = 0
    for sock in kept:
        try:
            sock.settimeout(5.0)
            exchange(sock)
        except OSError:
            lost += 1
        finally:
            sock.close()
    return {"attempts": loop.attempts, "failed": loop.failed, "errors": loop.errors,
            "gap_ms": round(loop.gap * 1000, 1), "held": held, "held_lost": lost}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restart")
    p.add_argument("--target", required=True)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--held", type=int, default=20)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--stop-file", help="stop once this file exists (FILE.ready is made once the held are open)")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        result = measure((host, int(port)), min(args.duration, 120.0), max(1, min(args.conns, 64)),
                         max(0, min(args.held, 1000)), args.timeout, args.stop_file)
    except OSError as exc:
        print(f"bench.restart: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"summary": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
