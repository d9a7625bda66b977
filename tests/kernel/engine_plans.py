"""Run inside a private namespace by test_engine_plans.py: the compiled engine's plans.

`python -m tests.kernel.engine_plans` relays connections on 127.0.0.1 (the namespace's own
loopback) to three echo backends, through an engine whose decide() hands over a plan
(engine.c's "Plans") the way NativeRelay does. It runs three phases of sequential
connections, each a request echoed back and a close:

- planned: the route stays; the plan serves every connection after the first;
- changed: the route is replaced by one whose only endpoint is the third backend;
- removed: the route is gone; decide() refuses.

Prints one JSON object: per phase, decide()'s calls, the connections each backend served,
the connections echoed whole, and the port's counters after the phase.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections import Counter
from typing import Any

from pyproxy.dataplane import engine
from pyproxy.dataplane.stats import PortStats

PER_PHASE = 60
REQUEST = b"ping " * 200 + b"\n"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        served[self.server.server_address[1]] += 1
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        self.request.sendall(data)


served: Counter[int] = Counter()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _client(address: tuple[str, int], results: list[bool]) -> None:
    for _ in range(PER_PHASE):
        try:
            with socket.create_connection(address, timeout=5) as sock:
                sock.sendall(REQUEST)
                got = b""
                while len(got) < len(REQUEST):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                results.append(got == REQUEST)
        except OSError:
            results.append(False)


def main() -> dict[str, Any]:
    servers = [_Server(("127.0.0.1", 0), _Echo) for _ in range(3)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = [s.server_address[1] for s in servers]
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    key = ("127.0.0.1", "TCP", listener.getsockname()[1])
    stats = PortStats()
    context = (stats, "default/echo:tcp")
    routes: dict[Any, Any] = {}
    calls = Counter[str]()
    offered: dict[str, list[int]] = {}

    def decide(client_ip: str, client_port: int, dst_ip: str, dst_port: int) -> Any:
        calls[phase] += 1
        route = routes.get((dst_ip, "TCP", dst_port))
        if route is None:
            return None
        targets = tuple(("127.0.0.1", port, False, context) for port in offered[route])
        stats.active += 1
        stats.total += 1
        return (*targets[0], (key, route, targets, stats))

    def closed(ctx: Any, bytes_in: int, bytes_out: int) -> None:
        ctx[0].active -= 1
        ctx[0].bytes_in += bytes_in
        ctx[0].bytes_out += bytes_out

    eng = engine.native.Engine(decide, lambda *a: None, closed, closed, lambda *a: None, dial_timeouts=(2.0,),
                               splice_after=64 * 1024, bulk_read=16 * 1024, copy_after=4,
                               pipe_size=1 << 20, routes=routes)
    eng.add_listener(listener.fileno())
    report: dict[str, Any] = {}
    for phase, endpoints in (("planned", ports), ("changed", ports[2:]), ("removed", None)):
        routes.pop(key, None)
        if endpoints is not None:
            route = f"route-{phase}"  # any object: what counts is that it is a new one
            offered[route] = endpoints
            routes[key] = route
        served.clear()
        results: list[bool] = []
        client = threading.Thread(target=_client, args=(listener.getsockname(), results), daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while (client.is_alive() or eng.count) and time.monotonic() < deadline:
            eng.run(10)
        report[phase] = {"decide_calls": calls[phase], "served": [served[p] for p in ports],
                         "echoed": sum(results), "total": stats.total, "active": stats.active,
                         "bytes_in": stats.bytes_in, "bytes_out": stats.bytes_out}
    eng.close()
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
