"""The scale bench's prober: run inside a node namespace, it answers "when did this first work".

Protocol on stdin/stdout, one line each (the harness, bench/rigs/scale.py, drives it):
    probe IP PORT TIMEOUT   ->  ok NS   (CLOCK_MONOTONIC ns of the first answer) | timeout
    quit                    ->  (exits)
It prints `ready` once at start. A probe opens a new non-blocking TCP connection to IP:PORT
every INTERVAL (1 ms), sends `WHO` (pyproxy.demo.echo's mode) on each that connects, and
stops at the first `pod=` line read back. So a route installed between two attempts is seen
within about one interval plus one round trip, whatever the earlier attempts were doing (a
SYN to a not-yet-routed address is simply left unanswered; a reject ends that attempt).

Rules kept: stdlib only; every loop bounded (TIMEOUT per probe, at most MAX_OPEN sockets,
each kept at most ATTEMPT_LIFE); every socket closed before the probe returns; traffic only
to the address it is told (inside the lab).
"""

from __future__ import annotations

import errno
import selectors
import socket
import sys
import time

INTERVAL = 0.001
ATTEMPT_LIFE = 0.25
MAX_OPEN = 400
REQUEST = b"WHO\n"


def probe(ip: str, port: int, timeout: float) -> int | None:
    """Monotonic ns of the first answer through ip:port, or None after `timeout` s."""
    sel = selectors.DefaultSelector()
    born: dict[socket.socket, float] = {}
    sent: set[socket.socket] = set()
    start = time.monotonic()
    next_open = start
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                return None
            if now >= next_open and len(born) < MAX_OPEN:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((ip, port))
                if code in (0, errno.EINPROGRESS):
                    born[sock] = now
                    sel.register(sock, selectors.EVENT_WRITE, sock)
                else:
                    sock.close()
                next_open = now + INTERVAL
            for key, events in sel.select(max(0.0, min(INTERVAL, next_open - time.monotonic()))):
                sock = key.data
                if sock not in sent and events & selectors.EVENT_WRITE:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        _drop(sel, born, sent, sock)
                        continue
                    try:
                        sock.send(REQUEST)
                    except OSError:
                        _drop(sel, born, sent, sock)
                        continue
                    sent.add(sock)
                    sel.modify(sock, selectors.EVENT_READ, sock)
                elif events & selectors.EVENT_READ:
                    try:
                        data = sock.recv(256)
                    except OSError:
                        data = b""
                    if data.startswith(b"pod="):
                        return time.monotonic_ns()
                    _drop(sel, born, sent, sock)
            now = time.monotonic()
            for sock in [s for s, t in born.items() if now - t > ATTEMPT_LIFE]:
                _drop(sel, born, sent, sock)
    finally:
        for sock in list(born):
            _drop(sel, born, sent, sock)
        sel.close()


def _drop(sel: selectors.BaseSelector, born: dict[socket.socket, float], sent: set[socket.socket],
          sock: socket.socket) -> None:
    sel.unregister(sock)
    born.pop(sock, None)
    sent.discard(sock)
    sock.close()


def main() -> int:
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            return 0
        if words[0] == "probe" and len(words) == 4:
            answer = probe(words[1], int(words[2]), float(words[3]))
            print("timeout" if answer is None else f"ok {answer}", flush=True)
        else:
            print(f"error unknown command {line.strip()!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
