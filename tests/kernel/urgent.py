"""Driver of test_urgent.py: urgent data (MSG_OOB) through a relay, both ways.

Run in a namespace of the test's own: `python -m tests.kernel.urgent engine|twin`. For each
copy mode (copy only, the default copy-then-splice, splice from the first byte), each size
(4 bytes, 1 MiB) and with or without a FIN after it, one connection goes through the real
relay (engine.NativeRelay or splice.FastRelay) to a backend on the namespace's loopback.
Each side sends PART, one urgent byte (`MSG_OOB`), PART, then (with FIN) shuts its sending
side; each side reads with SO_OOBINLINE. The relay passes the urgent byte in band
(docs/behaviour.md), so each side must receive exactly PART + b"!" + PART, then (with FIN)
a clean EOF. Each side pauses before the urgent byte, so the first part is read alone, except
in the `burst` cases (the urgent byte, the rest and the FIN may land with the first part). Prints one JSON object: case name -> what the client and the backend saw.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time

from pyproxy.dataplane import engine
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import FastRelay
from pyproxy.dataplane.stats import DataplaneStats
from tests.kernel.move_peer import table_for

BACKEND = ("127.0.0.1", 9000)
MODES = {"copy": -1, "default": 64 * 1024, "splice": 0}  # splice_after of each relay
SIZES = {"small": 4, "burst": 4, "big": 1 << 20}  # burst: no pause before the urgent byte
URGENT = b"!"
DEADLINE = 6.0  # seconds a side waits for what it expects


def expected(size: int) -> bytes:
    return b"A" * size + URGENT + b"C" * size


def talk(sock: socket.socket, size: int, fin: bool, seen: dict[str, object], who: str, pause: float = 0.05) -> None:
    """Send PART, the urgent byte, PART (and a FIN) while reading what comes, in two threads."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    sock.settimeout(DEADLINE)

    def send() -> None:
        try:
            sock.sendall(b"A" * size)
            time.sleep(pause)  # the first part is read before the urgent byte lands (0: they may land together) (a separate read)
            sock.send(URGENT, socket.MSG_OOB)
            sock.sendall(b"C" * size)
            if fin:
                sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            seen[f"{who}_send_error"] = type(err).__name__

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    want = expected(size)
    got = bytearray()
    end = "none"
    deadline = time.monotonic() + DEADLINE
    try:
        while time.monotonic() < deadline and (fin or len(got) < len(want)):
            chunk = sock.recv(1 << 20)
            if not chunk:
                end = "eof"
                break
            got += chunk
    except TimeoutError:
        end = "timeout"
    except OSError as err:
        end = type(err).__name__
    sender.join(DEADLINE)
    seen[f"{who}_bytes_ok"] = bytes(got) == want
    seen[f"{who}_got"] = len(got)
    seen[f"{who}_end"] = end


Job = tuple[int, bool, float, dict[str, object]]  # size, fin, pause, what was seen


def backend(server: socket.socket, jobs: dict[int, Job]) -> None:
    """Each accepted connection plays its case (found by the client's port)."""
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, jobs), daemon=True).start()


def serve(conn: socket.socket, jobs: dict[int, Job]) -> None:
    with conn:
        conn.settimeout(DEADLINE)
        header = b""
        while len(header) < 8:  # the client's case number, sent first
            part = conn.recv(8 - len(header))
            if not part:
                return
            header += part
        size, fin, pause, seen = jobs[int(header)]
        talk(conn, size, fin, seen, "backend", pause)


def run_case(listen: tuple[str, int], number: int, size: int, fin: bool, pause: float,
             jobs: dict[int, Job]) -> dict[str, object]:
    seen: dict[str, object] = {}
    jobs[number] = (size, fin, pause, seen)
    with socket.create_connection(listen, timeout=DEADLINE) as client:
        client.sendall(b"%08d" % number)
        talk(client, size, fin, seen, "client", pause)
    for _ in range(100):  # the backend's verdict
        if "backend_end" in seen:
            break
        time.sleep(0.05)
    return seen


async def main_async(kind: str) -> dict[str, object]:
    server = socket.create_server(BACKEND)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    jobs: dict[int, Job] = {}
    threading.Thread(target=backend, args=(server, jobs), daemon=True).start()
    results: dict[str, object] = {}
    number = 0
    for index, (mode, splice_after) in enumerate(MODES.items()):
        listen = ("127.0.0.1", 7001 + index)
        table = table_for(listen, BACKEND)
        relay: TcpRelay = (
            engine.NativeRelay(table, lambda ip: False, DataplaneStats(), RelayConfig(), splice_after=splice_after)
            if kind == "engine" else
            FastRelay(table, lambda ip: False, DataplaneStats(), RelayConfig(), splice_after=splice_after))
        await relay.start(*listen)
        for size_name, size in SIZES.items():
            for fin in (True, False):
                number += 1
                pause = 0.0 if size_name == "burst" else 0.05
                seen = await asyncio.to_thread(run_case, listen, number, size, fin, pause, jobs)
                results[f"{mode}-{size_name}-{'fin' if fin else 'open'}"] = seen
        await relay.drain(1.0)
    return results


def main() -> int:
    kind = sys.argv[1]
    if kind == "engine" and not engine.AVAILABLE:
        print(json.dumps({"error": "the compiled engine is not built"}))
        return 1
    if kind == "engine":
        import uvloop
        print(json.dumps(uvloop.run(main_async(kind))))
    else:
        print(json.dumps(asyncio.run(main_async(kind))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
