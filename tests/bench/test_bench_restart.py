"""The restart workload's figures (bench/loadtool/restart.py, summary): pure parts, no namespaces."""

from __future__ import annotations

import socket
import threading

from bench.loadtool import protocol as proto
from bench.loadtool.restart import measure
from bench.reporting.summary import Measurement, figures


def test_restart_figures_per_restart_and_share_of_held() -> None:
    m = Measurement("crash", "crash", "pyproxy-splice", 1,
                    summary={"attempts": 500, "failed": 30, "gap_ms": 812.5, "held": 10, "held_lost": 10, "restarts": 2})
    f = figures(m)
    assert f["gap_ms"] == 812.5 and f["failed_per_restart"] == 15.0 and f["held_lost_share"] == 1.0
    assert f["errors"] == 30.0


def test_the_restart_client_counts_failures_and_held_connections_against_a_real_backend() -> None:
    """A tiny R-mode backend on loopback that closes the held connections halfway: the client
    reports them lost, and the new connections made before it stopped answering as fine."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            header = conn.recv(proto.HEADER_SIZE)
            if conn.recv(1) == b"?":
                conn.sendall(b"x")
            if len(held) < 3 and header:
                held.append(conn)
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    timer = threading.Timer(0.5, lambda: [s.close() for s in list(held)])
    timer.start()
    try:
        result = measure(("127.0.0.1", port), 1.0, 2, 3, 0.5)
    finally:
        stop.set()
        thread.join(2)
        server.close()
        timer.cancel()
    assert result["held"] == 3 and result["held_lost"] == 3
    assert isinstance(result["attempts"], int) and result["attempts"] > 10 and result["failed"] == 0
