"""Data-plane counters: plain integers bumped on the hot path, read by the metrics exporter.

Counting is an attribute increment; nothing here allocates per byte or per packet.
`ConnectionInfo` is the read-only picture of one open connection or UDP flow that the
relays hand to the inspection API (`pyproxy/inspect/`): a copy made when asked for, so
nothing outside a relay ever holds its sockets or its mutable state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from pyproxy.model.objects import ServicePortName


Address = tuple[str, int]


class ConnectionInfo(NamedTuple):
    """One open TCP pair or UDP flow, as seen at the moment it was read (a tuple: cheap to
    make for every open connection when the inspection API asks)."""

    protocol: str  # "TCP" or "UDP"
    port: ServicePortName
    client: Address
    frontend: Address  # the service address the client connected to
    endpoint: Address | None  # None while the first dial is in progress
    bytes_in: int  # client -> endpoint
    bytes_out: int  # endpoint -> client
    started: float  # monotonic seconds
    last_active: float  # monotonic seconds
    client_done: bool = False  # the client has sent EOF (TCP)
    endpoint_done: bool = False  # the endpoint has sent EOF (TCP)


@dataclass
class PortStats:
    active: int = 0
    total: int = 0
    bytes_in: int = 0  # client -> endpoint
    bytes_out: int = 0  # endpoint -> client
    refused: int = 0
    datagrams_in: int = 0  # UDP ports only (their active/total count flows)
    datagrams_out: int = 0


@dataclass
class UdpStats:
    """The UDP relay as a whole (per service port figures are in `PortStats`)."""

    flows_active: int = 0
    flows_total: int = 0
    datagrams_in: int = 0  # client -> endpoint
    datagrams_out: int = 0  # endpoint -> client
    bytes_in: int = 0
    bytes_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)  # datagrams not forwarded, by reason
    flows_closed: Counter[str] = field(default_factory=Counter)  # idle, evicted, endpoint_gone, ...


@dataclass
class DataplaneStats:
    ports: dict[ServicePortName, PortStats] = field(default_factory=dict)
    dial_failures: Counter[tuple[ServicePortName, tuple[str, int]]] = field(default_factory=Counter)
    unknown_destination: int = 0
    connection_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, error): errors.py
    udp: UdpStats = field(default_factory=UdpStats)
    # called before the counters are read: a relay that counts bytes elsewhere (the compiled
    # engine, engine.py) adds the bytes its open connections moved since it last reported
    refreshers: list[Callable[[], None]] = field(default_factory=list)

    def refresh(self) -> None:
        for refresh in self.refreshers:
            refresh()

    def port(self, name: ServicePortName) -> PortStats:
        stats = self.ports.get(name)
        if stats is None:
            stats = self.ports[name] = PortStats()
        return stats

    def dial_failed(self, name: ServicePortName, address: tuple[str, int]) -> None:
        self.dial_failures[(name, address)] += 1
