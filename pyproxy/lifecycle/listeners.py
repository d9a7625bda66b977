"""Serving on the listeners: handed over, bound early, the worker's, or bound here.

Rules kept here:
- A listener that came from elsewhere is used as it is: handed over by a predecessor (its
  accept queue shared, nothing queued lost), bound before the imports (lifecycle/early.py),
  or the worker's own (`--workers N`). Only what is missing is bound here.
- UDP first: it binds beside a refused predecessor's socket at once (SO_REUSEADDR: the newer
  one reads). A TCP port still held (a refused predecessor, or an older release that
  releases it when it stops) is retried every 10 ms, with one log line, until it is free.
- Only the worker that programs the kernel serves UDP and IPv6; the others serve IPv4 TCP
  and close whatever else they were given.
- A node without IPv6 (no `::1`, or no IPv6 at all) serves IPv4 only, with one warning line.
- Listeners of the HTTP servers (`http:<port>`) are left in `got` for the observer to take.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from pyproxy.dataplane.dualstack import DualStackRelay
from pyproxy.dataplane.sockets import transparent_listener
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.model.family import join_host_port

log = logging.getLogger("pyproxy")

RETRY = 0.01  # seconds between binds of a port still held


async def serve_listeners(got: dict[str, socket.socket], relay: DualStackRelay, udp: UdpRelay, *,
                          tcp_port: int, udp_port: int, programs_kernel: bool,
                          worker_listener: socket.socket | None = None) -> None:
    """Start `relay` and `udp` on the listeners in `got` (taken out of it) or bound here;
    the rest (the HTTP listeners) stay in `got`."""
    tcp = worker_listener or got.pop("tcp", None)
    tcp6, udp4, udp6 = got.pop("tcp6", None), got.pop("udp", None), got.pop("udp6", None)
    if programs_kernel:  # other workers serve TCP (IPv4) only
        if udp4 is None:
            udp4 = await bind("127.0.0.1", socket.SOCK_DGRAM, udp_port)
        await udp.start("127.0.0.1", udp_port, udp4)
        if udp6 is None:
            udp6 = await bind_ipv6(socket.SOCK_DGRAM, udp_port)
        if udp6 is not None:
            await udp.start("::1", udp_port, udp6)
        if tcp6 is None:
            tcp6 = await bind_ipv6(socket.SOCK_STREAM, tcp_port)
    else:
        for sock in (udp4, udp6, tcp6):
            if sock is not None:
                sock.close()
        tcp6 = None
    if tcp is None:
        tcp = await bind("127.0.0.1", socket.SOCK_STREAM, tcp_port)
    await relay.start("127.0.0.1", tcp_port, tcp, tcp6)


async def bind_ipv6(kind: int, port: int) -> socket.socket | None:
    """The [::1] listener, or None on a node without IPv6 (one warning line)."""
    try:
        return await bind("::1", kind, port)
    except OSError as err:  # EAFNOSUPPORT, or EADDRNOTAVAIL without ::1
        what = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        log.warning("no IPv6 %s listener on [::1]:%d (%s): serving IPv4 only", what, port, err)
        return None


async def bind(host: str, kind: int, port: int) -> socket.socket:
    """A new transparent listener; while the port is held (a refused predecessor, or a
    release without hand-over that will release it when it stops), retry."""
    waiting_since = time.monotonic()
    while True:
        try:
            return transparent_listener(host, port, kind)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
        if time.monotonic() - waiting_since < RETRY:
            log.info("waiting for the running pyproxy to release %s (one that refused the hand-over, "
                     "or an older release without it: it releases the port when it stops)",
                     join_host_port(host, port))
        await asyncio.sleep(RETRY)


def listener_names(relay: DualStackRelay, udp: UdpRelay, http: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """Every listener of the process by the name a successor takes it under, with its fd."""
    named: list[tuple[str, int]] = []
    for name, sock in (("tcp", relay.listener), ("tcp6", relay.listener6)):
        if sock is not None:
            named.append((name, sock.fileno()))
    for sock in udp.listeners:
        named.append(("udp6" if sock.family == socket.AF_INET6 else "udp", sock.fileno()))
    for port, fd in http:
        named.append((f"http:{port}", fd))
    return named
