"""Driver of test_adopt_stale.py: a pair taken up from a predecessor closes while the
predecessor still holds its dups; does anything of it reach the next connection?

Run in a namespace of the test's own: `python -m tests.kernel.adopt_stale engine|twin`.
Prints one JSON line: what the next connection saw.

The story, as a hand-over plays it: this process adopts a pair (its fds are dups of
sockets the "predecessor", here the driver itself, keeps open until it hears "done"); the
client half-closes, the pair finishes and closes its fds. A new connection arrives and
gets the same fd numbers (and, in the engine, the same pair struct). Then the old client
resets: its socket, still alive in the predecessor's dup, reports an error. An epoll
registration that outlived the adopted pair's close would deliver that error to the new
connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import threading

import uvloop

from pyproxy.dataplane import engine
from pyproxy.dataplane.connstate import DirectionState, TcpState
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import FastRelay
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpRelay
from tests.kernel.move_peer import table_for

LISTEN = ("127.0.0.1", 7001)
BACKEND = ("127.0.0.1", 9000)
PREDECESSOR = ("127.0.0.1", 7100)  # where the "predecessor" accepted the old client
ROUNDS = 20


def echo_server(ready: threading.Event) -> None:
    """Echo each connection until its EOF, then close it (a thread per connection)."""
    server = socket.create_server(BACKEND)
    ready.set()
    while True:
        conn, _ = server.accept()

        def serve(c: socket.socket) -> None:
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def plug_below(fd: int) -> list[int]:
    """Occupy every free fd number below `fd` (which must be free), so `fd` is the next one given out."""
    plugs: list[int] = []
    for _ in range(fd + 1):
        got = os.open(os.devnull, os.O_RDONLY)
        if got >= fd:
            os.close(got)
            break
        plugs.append(got)
    return plugs


async def adopted_pair_then_next(relay: TcpRelay, old_listener: socket.socket, round_no: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    old_client = socket.create_connection(PREDECESSOR)
    accepted, address = old_listener.accept()
    upstream = socket.create_connection(BACKEND)
    state = TcpState(table_for(LISTEN, BACKEND).routes[(LISTEN[0], "TCP", LISTEN[1])].port.name,
                     address, LISTEN, BACKEND, age=0.0, idle=0.0, up=DirectionState(), down=DirectionState())
    next_client = socket.socket()  # made now, so the adopted pair's fd numbers are free for the relay later
    fds = [os.dup(accepted.fileno()), os.dup(upstream.fileno())]
    await relay.adopt_pair(state, fds)
    old_client.sendall(b"old\n")
    old_client.settimeout(5)
    echoed = await asyncio.to_thread(old_client.recv, 100)  # the loop must run meanwhile: the relay is on it
    old_client.shutdown(socket.SHUT_WR)  # the pair ends: both directions shut, its fds closed
    for _ in range(200):
        if not relay.pairs:
            break
        await asyncio.sleep(0.01)
    plugs = plug_below(fds[0])  # the relay's next accept gets the adopted client's fd number
    next_client.setblocking(False)
    await loop.sock_connect(next_client, LISTEN)
    for plug in plugs:
        os.close(plug)
    first = await exchange(next_client, b"first\n")
    old_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    old_client.close()  # a reset reaches `accepted`, which the predecessor still holds
    await asyncio.sleep(0.05)
    second = await exchange(next_client, b"second\n")
    next_client.close()
    accepted.close()  # the predecessor's dups go last, as after "done"
    upstream.close()
    return {"round": round_no, "old_echo": echoed.decode(), "first": first, "second": second}


async def exchange(sock: socket.socket, data: bytes) -> str:
    """Send `data`, return its echo (or the name of the error that came instead)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, data)
        return (await asyncio.wait_for(loop.sock_recv(sock, 100), 5)).decode()
    except (OSError, TimeoutError) as err:
        return type(err).__name__


async def main_async(kind: str) -> list[dict[str, object]]:
    ready = threading.Event()
    threading.Thread(target=echo_server, args=(ready,), daemon=True).start()
    ready.wait(5)
    table = table_for(LISTEN, BACKEND)
    stats = DataplaneStats()
    relay: TcpRelay = (engine.NativeRelay(table, lambda ip: False, stats, RelayConfig()) if kind == "engine"
                       else FastRelay(table, lambda ip: False, stats, RelayConfig()))
    await relay.start(*LISTEN)
    UdpRelay(table, lambda ip: False, stats)  # as in a process: unused here
    old_listener = socket.create_server(PREDECESSOR)
    results = [await adopted_pair_then_next(relay, old_listener, i) for i in range(ROUNDS)]
    await relay.drain(1.0)
    return results


def main() -> int:
    kind = sys.argv[1]
    if kind == "engine" and not engine.AVAILABLE:
        print(json.dumps({"error": "the compiled engine is not built"}))
        return 1
    print(json.dumps(uvloop.run(main_async(kind))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
