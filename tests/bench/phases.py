"""A connection that changes shape, run as scripts in a test namespace (copy <-> splice switching).

    python -m tests.bench.phases server PORT
    python -m tests.bench.phases client HOST:PORT RELAY_PID

The server echoes every byte back until the client half-closes, then half-closes too. The
client runs, on one connection: 200 small round trips, a bulk phase (24 MiB sent while the
echo is read back), 200 small round trips again, then half-closes and reads to EOF. It checks
that every echoed byte equals what it sent (in order), and counts the pipes the relay holds
(/proc/RELAY_PID/fd) during the bulk phase and after the small phase that follows it. Prints
JSON: {"intact": bool, "pipes_before": n, "pipes_bulk": n, "pipes_after": n, "eof": bool}.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time

SMALL = 200
BULK = 24 << 20


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 20):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def pipes(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return n


def client(target: str, relay_pid: int) -> dict[str, object]:
    before = pipes(relay_pid)  # the relay's own (its event loop's wake-up pipe, say)
    host, _, port = target.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rng = random.Random(7)
    sent, got = bytearray(), bytearray()

    def small_phase() -> None:
        for _ in range(SMALL):
            msg = rng.randbytes(rng.randrange(1, 400))
            sock.sendall(msg)
            sent.extend(msg)
            want = len(sent)
            while len(got) < want:
                got.extend(sock.recv(65536))

    small_phase()
    bulk = rng.randbytes(BULK)
    seen: list[int] = []

    def reader() -> None:
        want = len(sent) + BULK
        while len(got) < want:
            got.extend(sock.recv(1 << 20))
            if len(got) > want - BULK // 2 and not seen:
                seen.append(pipes(relay_pid))

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(bulk)
    sent.extend(bulk)
    t.join(60)
    small_phase()
    time.sleep(0.2)
    after = pipes(relay_pid)
    sock.shutdown(socket.SHUT_WR)
    tail = sock.recv(1)
    return {"intact": bytes(got) == bytes(sent), "pipes_before": before, "pipes_bulk": seen[0] if seen else -1,
            "pipes_after": after, "eof": tail == b""}


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        print(json.dumps(client(sys.argv[2], int(sys.argv[3]))))
