"""The read-only snapshot interface between a running proxy and the inspection views.

Rules kept here:
- This is the only inspection code that touches live objects, and it only reads them:
  the cluster store and service table (the model), each balancer's affinity table
  (`AffinityTable.entries()`, a copy), and the relays' `connections()` (copies made by
  the relays themselves). Nothing here holds a socket or a relay's private state.
- It runs on the event loop, like the relays, so what it reads is one consistent instant.
- Each call turns what it read into JSON rows with the pure functions of `views`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.inspect import views
from pyproxy.inspect.views import AffinityView, Row
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable


@dataclass
class ProxyReader:
    store: ClusterStore
    table: ServiceTable
    connections: Callable[[], Iterable[ConnectionInfo]]  # every relay's, chained
    shutting_down: Callable[[], bool] = lambda: False
    worker: int = 0
    clock: Callable[[], float] = field(default=time.monotonic)  # the relays' clock

    def rows(self, kind: str) -> list[Row]:
        if kind == "services":
            return self.services()
        if kind == "endpoints":
            return views.endpoint_rows(self.services())
        if kind == "affinity":
            return self.affinity()
        if kind == "connections":
            return views.connection_rows(self.connections(), self.table.ports, self.clock(),
                                         self.shutting_down(), self.worker, views.port_numbers(self.store.services))
        raise ValueError(f"unknown kind {kind!r}")

    def services(self) -> list[Row]:
        return views.service_rows(self.store.services, self.store.slices_of, self.table.ports, self.table.routes)

    def affinity(self) -> list[Row]:
        tables = {
            name: AffinityView(int(balancer.affinity.timeout), tuple(balancer.affinity.entries()))
            for name, balancer in self.table.balancers.items()
            if balancer.affinity is not None
        }
        return views.affinity_rows(tables, self.clock(), self.worker, views.port_numbers(self.store.services))
