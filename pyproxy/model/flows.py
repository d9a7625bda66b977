"""The UDP flow table: which client datagrams belong to which upstream, and for how long.

A flow is one (client ip:port, service address ip:port) pair and the endpoint it was
assigned when its first datagram arrived (SPEC.md §7). The table keeps these rules:
- A flow lives while it is used: every datagram, either way, slides its idle expiry.
  A flow idle for more than `idle_timeout` seconds is expired; its next datagram makes a
  new flow, with a fresh pick (or the affinity pin).
- The table is bounded by `capacity`. A new flow beyond it evicts the least recently
  active flow: with DNS every query is a new client port, so refusing new flows would
  stop name resolution while evicting only costs a long-quiet flow its state.
- A flow whose endpoint has left its service port's usable set is dropped at once, so no
  reply is expected from a pod that is gone (`retain`).
- The reply socket of a service address is shared by that address's flows; the table
  counts them so the data plane knows when a reply socket is no longer needed.
- Time is passed in (`now`, seconds on a monotonic clock); nothing here reads a clock or
  touches a socket. What the data plane attaches to a flow (its sockets) is `handle`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pyproxy.model.objects import ServicePortName
from pyproxy.model.table import PortState

Address = tuple[str, int]
FlowKey = tuple[Address, Address]  # (client ip:port, service ip:port)
H = TypeVar("H")


@dataclass(eq=False)
class Flow(Generic[H]):
    key: FlowKey
    port: ServicePortName
    endpoint: Address
    handle: H
    last_active: float = 0.0

    @property
    def client(self) -> Address:
        return self.key[0]

    @property
    def service_address(self) -> Address:
        return self.key[1]


class FlowTable(Generic[H]):
    """FlowKey -> Flow, least recently active first; indexed by service port and address."""

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        if capacity < 1:
            raise ValueError("flow capacity must be at least 1")
        if idle_timeout <= 0:
            raise ValueError("flow idle timeout must be positive")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._flows: OrderedDict[FlowKey, Flow[H]] = OrderedDict()
        self._by_port: dict[ServicePortName, set[FlowKey]] = {}
        self._per_address: dict[Address, int] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow[H]]:
        return iter(list(self._flows.values()))

    def get(self, key: FlowKey) -> Flow[H] | None:
        return self._flows.get(key)

    def touch(self, flow: Flow[H], now: float) -> None:
        """A datagram passed: slide the flow's expiry."""
        flow.last_active = now
        if flow.key in self._flows:
            self._flows.move_to_end(flow.key)

    def add(self, flow: Flow[H], now: float) -> list[Flow[H]]:
        """Admit a new flow; returns the flows evicted to keep within capacity."""
        if flow.key in self._flows:
            raise KeyError(f"flow {flow.key} already exists")
        flow.last_active = now
        self._flows[flow.key] = flow
        self._by_port.setdefault(flow.port, set()).add(flow.key)
        self._per_address[flow.service_address] = self._per_address.get(flow.service_address, 0) + 1
        evicted = []
        while len(self._flows) > self.capacity:
            evicted.append(self._pop(next(iter(self._flows))))
        return evicted

    def adopt(self, flows: Collection[Flow[H]]) -> list[Flow[H]]:
        """Admit flows moved from another process, each with its own `last_active` (the
        order stays least recently active first); returns the flows evicted to keep
        within capacity. Like `add`, a key already present is an error."""
        keys = [f.key for f in flows]
        if len(set(keys)) != len(keys) or any(key in self._flows for key in keys):
            raise KeyError("moved flows repeat a flow key")
        fresh = list(flows)
        if not fresh:
            return []
        for flow in fresh:
            self._by_port.setdefault(flow.port, set()).add(flow.key)
            self._per_address[flow.service_address] = self._per_address.get(flow.service_address, 0) + 1
        merged = sorted([*self._flows.values(), *fresh], key=lambda f: f.last_active)
        self._flows = OrderedDict((f.key, f) for f in merged)
        evicted = []
        while len(self._flows) > self.capacity:
            evicted.append(self._pop(next(iter(self._flows))))
        return evicted

    def remove(self, key: FlowKey) -> Flow[H] | None:
        return self._pop(key) if key in self._flows else None

    def expire(self, now: float, limit: int = 1000) -> list[Flow[H]]:
        """Remove up to `limit` flows idle past the timeout, oldest first."""
        expired: list[Flow[H]] = []
        while self._flows and len(expired) < limit:
            oldest = next(iter(self._flows.values()))
            if now - oldest.last_active <= self.idle_timeout:
                break
            expired.append(self._pop(oldest.key))
        return expired

    def next_expiry(self) -> float | None:
        """When the least recently active flow will be idle past the timeout (None: no flows)."""
        if not self._flows:
            return None
        return next(iter(self._flows.values())).last_active + self.idle_timeout

    def ports(self) -> set[ServicePortName]:
        """The service ports that have flows."""
        return set(self._by_port)

    def retain(self, port: ServicePortName, usable: Collection[Address]) -> list[Flow[H]]:
        """Drop the port's flows whose endpoint is not in `usable`; returns them."""
        gone = [key for key in self._by_port.get(port, ()) if self._flows[key].endpoint not in usable]
        return [self._pop(key) for key in gone]

    def address_in_use(self, service_address: Address) -> bool:
        """Whether any flow still answers its client from this service address."""
        return service_address in self._per_address

    def clear(self) -> list[Flow[H]]:
        return [self._pop(key) for key in list(self._flows)]

    def _pop(self, key: FlowKey) -> Flow[H]:
        flow = self._flows.pop(key)
        keys = self._by_port[flow.port]
        keys.discard(key)
        if not keys:
            del self._by_port[flow.port]
        count = self._per_address[flow.service_address] - 1
        if count:
            self._per_address[flow.service_address] = count
        else:
            del self._per_address[flow.service_address]
        return flow


def usable_endpoints(state: PortState | None) -> frozenset[Address]:
    """The endpoints a flow of this service port may keep talking to (none once the port is gone).

    The same set the affinity table keeps pins for: the cluster set and the local set.
    """
    if state is None:
        return frozenset()
    return frozenset(e.address for e in state.endpoints.cluster + state.endpoints.local)
