"""Transparent listening sockets: the one place they are made.

Rules kept here:
- Only `socket` is imported, so `pyproxy/lifecycle/early.py` can bind the listeners before
  the rest of pyproxy is imported (a crash restart's black hole lasts only until then).
- An IPv6 socket never carries IPv4 (IPV6_V6ONLY): each family has its own listener.
- A listener accepts TPROXY'd traffic for any destination (IP_TRANSPARENT or
  IPV6_TRANSPARENT), reuses its address (SO_REUSEADDR), and is non-blocking.
"""

from __future__ import annotations

import socket

IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>
LISTEN_BACKLOG = 4096  # a burst of connections waits here for accept(); overflow drops handshakes


def family_socket(ipv6: bool, kind: int) -> socket.socket:
    """A socket of one family; an IPv6 one never carries IPv4 (no mapped addresses)."""
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, kind)
    if ipv6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        except OSError:
            sock.close()
            raise
    return sock


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT, or IPV6_TRANSPARENT on an IPv6 socket."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def transparent_listener(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that accepts TPROXY'd traffic for any destination of `host`'s family."""
    sock = family_socket(":" in host, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
