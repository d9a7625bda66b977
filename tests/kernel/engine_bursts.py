"""Run inside a private namespace by test_engine_bursts.py: the compiled engine driven by hand.

`python -m tests.kernel.engine_bursts SPLICE_AFTER PIPE_SIZE BYTES [fin]` relays one
connection on 127.0.0.1 (the namespace's own loopback), and for each direction queues a
burst of BYTES on the engine's source socket whole before the engine runs again, then runs
it until the burst has come out or two seconds have passed. The engine's sockets are
edge-triggered: the burst brings one edge, so a read that stops with bytes left (its round
limit, a switch to splicing) must look again by itself. With `fin` the backend's burst is
followed by its FIN before the engine runs: the event then reports the FIN with the data,
and the direction must end only after the last byte. Prints one JSON line: the bytes out
per direction, and whether the client saw the EOF.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

from pyproxy.dataplane import engine

BIG_BUFFER = 8 << 20  # every socket can hold a whole burst: nothing holds the sender back


def _pump(eng: Any, sock: socket.socket, size: int, until_eof: bool = False) -> tuple[bytes, bool]:
    """What comes out on `sock`: BYTES (or, with until_eof, everything up to the EOF), and
    whether the EOF came."""
    parts, got, deadline = [], 0, time.monotonic() + 2.0
    sock.setblocking(False)
    while (got < size or until_eof) and time.monotonic() < deadline:
        eng.run(20)
        for _ in range(1000):
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts), False


def _queue(sock: socket.socket, data: bytes) -> None:
    """Send the burst whole (the engine does not run meanwhile), then let it land."""
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    sender.join(5.0)
    time.sleep(0.2)


def main(splice_after: int, pipe_size: int, size: int, fin: bool = False) -> dict[str, int | bool]:
    backend = socket.create_server(("127.0.0.1", 0))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG_BUFFER)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    target = backend.getsockname()

    def decide(*_: object) -> tuple[str, int, bool, object]:
        return target[0], target[1], False, None

    eng = engine.native.Engine(decide, lambda *a: None, lambda *a: None, lambda *a: None, lambda *a: None,
                               dial_timeouts=(2.0,), splice_after=splice_after, bulk_read=16 * 1024,
                               copy_after=4, pipe_size=pipe_size)
    eng.add_listener(listener.fileno())
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUFFER)
    backend.settimeout(0.05)
    upstream = None
    for _ in range(100):  # accept and dial
        eng.run(20)
        try:
            upstream, _ = backend.accept()
            break
        except TimeoutError:
            continue
    assert upstream is not None, "the engine never dialed"
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUFFER)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG_BUFFER)
    for _ in range(5):
        eng.run(10)  # the connect's completion
    up, down = os.urandom(size), os.urandom(size)
    _queue(client, up)
    out_up, _ = _pump(eng, upstream, size)
    if fin:
        upstream.sendall(down)
        upstream.shutdown(socket.SHUT_WR)
        time.sleep(0.2)  # data and FIN have landed before the engine looks
    else:
        _queue(upstream, down)
    out_down, eof = _pump(eng, client, size, until_eof=fin)
    return {"up": len(out_up) if out_up == up[:len(out_up)] else -1,
            "down": len(out_down) if out_down == down[:len(out_down)] else -1, "eof": eof}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["fin"])),
          flush=True)
