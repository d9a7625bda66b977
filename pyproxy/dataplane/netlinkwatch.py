"""Whether the node's links, addresses or routes may have changed since the last look.

Rules kept here:
- One rtnetlink socket joined to the multicast groups of link, IPv4/IPv6 address and
  IPv4/IPv6 route changes, opened before the first read it guards (so no change between
  that read and the subscription is missed). `changed()` drains, without blocking, what
  arrived since the last call and says whether anything did; the caller reads the node
  again only then (pyroute2's reads cost milliseconds of CPU each, at every sync).
- When in doubt, changed: the first call, a socket that could not be opened, a receive
  buffer that overflowed (ENOBUFS: messages were lost), any other error.
- Bounded: one call drains at most MAX_MESSAGES messages, then answers "changed".
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("pyproxy.dataplane")

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
MAX_MESSAGES = 10_000


class ChangeWatch:
    """See the module doc. Not thread-safe: one caller (the proxier's sync) at a time."""

    def __init__(self, groups: int = GROUPS) -> None:
        self._first = True
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE)
            sock.bind((0, groups))
            self._sock = sock
        except OSError as err:
            log.warning("cannot watch the node's netlink changes (%s): reading the node at every sync", err)

    def changed(self) -> bool:
        first, self._first = self._first, False
        if self._sock is None:
            return True
        seen = first
        for _ in range(MAX_MESSAGES):
            try:
                if not self._sock.recv(65536):
                    return seen
            except BlockingIOError:
                return seen
            except OSError:  # ENOBUFS: the kernel dropped messages; anything may have changed
                return True
            seen = True
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
