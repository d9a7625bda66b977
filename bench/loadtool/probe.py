"""`python -m bench.probe --target HOST:PORT --timeout S`: is the path to a backend usable?

Rules kept here:
- Ready means one full `R` exchange (1-byte request, 1-byte answer) succeeded end to end, not
  merely that something accepted the connection (a proxy accepts before its upstream exists).
- Attempts repeat every 50 ms until the first success or the timeout; each attempt has its
  own short timeout. Exit 0 when ready, 1 when not (last error on stderr).
- Plain blocking sockets and the standard library only, so it starts in a few milliseconds.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from bench.loadtool import protocol as proto


def attempt(target: tuple[str, int], timeout: float) -> None:
    with socket.create_connection(target, timeout=timeout) as sock:
        sock.sendall(proto.rr(1, 1).pack() + b"?")
        if sock.recv(1) != b"x":
            raise ConnectionError("no answer")


def wait_ready(target: tuple[str, int], timeout: float) -> str:
    """'' when ready within timeout, else the last error."""
    deadline = time.monotonic() + timeout
    error = "not tried"
    while time.monotonic() < deadline:
        try:
            attempt(target, min(1.0, max(0.05, deadline - time.monotonic())))
            return ""
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    return error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe")
    p.add_argument("--target", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    error = wait_ready((host, int(port)), args.timeout)
    if error:
        print(f"not ready: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
