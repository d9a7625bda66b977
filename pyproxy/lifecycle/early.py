"""Listen first: the proxy's TCP and UDP listeners bound before anything else is imported.

Theory of operation:
- After a crash the kernel's rules are still in place and TPROXY sends every new
  connection to a port nobody listens on: the SYN is dropped and the client retransmits
  it a second later. The black hole lasts until a process listens again, so the command
  line binds the listeners before it imports the rest of pyproxy (a few hundred ms of
  imports, netlink and the first sync): from then on the kernel completes handshakes into
  the accept queue and keeps datagrams in the receive buffer, and the proxy serves them
  as soon as its table is built. A connection made meanwhile waits; none is dropped.
- Binding fails with EADDRINUSE while a running pyproxy holds the port: then it takes the
  normal path (a hand-over from that process). Any other failure is left to the normal
  path too, which reports it.
- Only `socket` and `pyproxy/dataplane/sockets.py` (which imports only `socket`) run
  before the bind, so it is cheap.
- The supervisor (master.py) binds them this way and holds them for its children; with
  `--workers N` it makes the TCP reuseport group itself and the rest here
  (`extra_listeners`).
"""

from __future__ import annotations

import socket

from pyproxy.dataplane.sockets import transparent_listener


def _listener(port: int, kind: int, ipv6: bool = False) -> socket.socket:
    return transparent_listener("::1" if ipv6 else "127.0.0.1", port, kind)


def bind_early(tcp_port: int, udp_port: int) -> dict[str, socket.socket]:
    """{"tcp": ..., "udp": ...} when both could be bound now, else {} (nothing kept); with
    "tcp6" and "udp6" on [::1] too where the node has IPv6 (else the normal path warns)."""
    try:
        tcp = _listener(tcp_port, socket.SOCK_STREAM)
    except OSError:
        return {}
    try:
        udp = _listener(udp_port, socket.SOCK_DGRAM)
    except OSError:
        tcp.close()
        return {}
    got = {"tcp": tcp, "udp": udp}
    for name, port, kind in (("tcp6", tcp_port, socket.SOCK_STREAM), ("udp6", udp_port, socket.SOCK_DGRAM)):
        try:
            got[name] = _listener(port, kind, ipv6=True)
        except OSError:
            pass
    return got


def extra_listeners(tcp_port: int, udp_port: int) -> dict[str, socket.socket]:
    """Beside a reuseport group of IPv4 TCP listeners: UDP, and [::1] TCP and UDP where the
    node has IPv6 (what is missing is bound, or warned about, by the serving process)."""
    got: dict[str, socket.socket] = {}
    for name, port, kind, ipv6 in (("udp", udp_port, socket.SOCK_DGRAM, False),
                                   ("tcp6", tcp_port, socket.SOCK_STREAM, True),
                                   ("udp6", udp_port, socket.SOCK_DGRAM, True)):
        try:
            got[name] = _listener(port, kind, ipv6=ipv6)
        except OSError:
            pass
    return got
