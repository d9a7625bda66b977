"""Both address families behind one TCP relay interface.

Rules kept here:
- A transparent listener serves one family (TPROXY hands a packet only to a socket of its
  own family), so the TCP data plane is two relays of the configured kind, one listening
  on 127.0.0.1 and one on ::1, both on `tcpProxyPort`, sharing the service table, the
  counters and the local-source test. Every decision stays in the shared model; this
  module only fans the app's calls out to both.
- IPv6 is optional: a node without it (no IPv6 in the kernel, or none on lo) serves IPv4,
  with one warning line, as before dual-stack.
- Moving connections to a successor (pyproxy/lifecycle/connections.py): every relay
  detaches its own pairs; a moved pair is adopted by the relay of its client's family.
- With `dataplane.workers`, worker 0 alone serves IPv6 (as it alone serves UDP): every
  IPv6 client lands on one worker, so ClientIP affinity holds for them too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection, Iterator

from pyproxy.dataplane.relay import PairLike, TcpRelay
from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.dataplane.connstate import TcpState

log = logging.getLogger("pyproxy.dualstack")

IPV6_LISTENER = "::1"


class DualStackRelay:
    """A `TcpRelay` made of one relay per family (see the module's rules)."""

    def __init__(self, make: Callable[[], TcpRelay], serve_ipv6: bool = True) -> None:
        self.ipv4 = make()
        self.ipv6: TcpRelay | None = make() if serve_ipv6 else None
        self._started: list[TcpRelay] = []

    def describe(self) -> str:
        """Which byte path serves (for the start-up log line)."""
        return self.ipv4.kind

    @property
    def label(self) -> str:
        """Which byte path serves, as /metrics labels it ("engine" or "twin")."""
        return self.ipv4.label

    @property
    def relays(self) -> list[TcpRelay]:
        return self._started or [self.ipv4]

    @property
    def pairs(self) -> Collection[PairLike]:
        found: list[PairLike] = []
        for relay in self.relays:
            found.extend(relay.pairs)
        return found

    async def start(self, host: str, port: int, sock: socket.socket | None = None,
                    sock6: socket.socket | None = None) -> None:
        """The IPv4 relay on `host` (or `sock`), then the IPv6 one on [::1]:`port` (or
        `sock6`, a listener handed over by a predecessor) if it can."""
        await self.ipv4.start(host, port, sock)
        self._started = [self.ipv4]
        if self.ipv6 is None:
            if sock6 is not None:
                sock6.close()
            return
        try:
            await self.ipv6.start(IPV6_LISTENER, port, sock6)
        except OSError as err:  # EAFNOSUPPORT, or EADDRNOTAVAIL without ::1
            log.warning("no IPv6 listener on [%s]:%d (%s): serving IPv4 only", IPV6_LISTENER, port, err)
            return
        self._started.append(self.ipv6)

    @property
    def listener(self) -> socket.socket | None:
        return self.ipv4.listener

    @property
    def listener6(self) -> socket.socket | None:
        return self.ipv6.listener if self.ipv6 is not None and self.ipv6 in self._started else None

    def release_listener(self) -> None:
        for relay in self.relays:
            relay.release_listener()

    def stop_accepting(self) -> None:
        for relay in self.relays:
            relay.stop_accepting()

    async def drain(self, timeout: float) -> int:
        cuts = await asyncio.gather(*(relay.drain(timeout) for relay in self.relays))
        return sum(cuts)

    def connections(self) -> Iterator[ConnectionInfo]:
        for relay in self.relays:
            yield from relay.connections()

    async def detach_pairs(self) -> list[tuple[TcpState, list[int]]]:
        """All or nothing, as each relay's: if one fails, the pairs the others handed out are
        taken back (adopted from their dups, as after a refused hand-over)."""
        moved: list[tuple[TcpState, list[int]]] = []
        for relay in self.relays:
            try:
                moved += await relay.detach_pairs()
            except BaseException:
                for state, fds in moved:
                    await self.adopt_pair(state, fds)
                raise
        return moved

    def relay_for(self, client_ip: str) -> TcpRelay:
        """The relay that takes up a moved pair of this client."""
        if ":" in client_ip and self.ipv6 is not None and self.ipv6 in self._started:
            return self.ipv6
        return self.ipv4

    async def adopt_pair(self, state: TcpState, fds: list[int]) -> None:
        await self.relay_for(state.client[0]).adopt_pair(state, fds)
