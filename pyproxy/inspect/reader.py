"""The read-only snapshot interface between a running proxy and the inspection views.

Rules kept here:
- This is the only inspection code that touches live objects, and it only reads them:
  the cluster store and service table (the model), each balancer's affinity table
  (`AffinityTable.entries()`, a copy), and the relays' `connections()` (copies made by
  the relays themselves). Nothing here holds a socket or a relay's private state.
- It runs on the event loop, like the relays, so what it reads is one consistent instant.
- Each call turns what it read into a JSON page with the pure functions of `views`; rows
  are built only for the rows asked for (offset + limit), so a big table costs one pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.inspect import views
from pyproxy.inspect.views import AffinityView, Query, Row
from pyproxy.model.objects import ServicePortName
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

    def page(self, kind: str, query: Query, workers: int = 1) -> Row:
        """This proxy's page of `kind` for `query` (see `views.page`)."""
        if kind == "services":
            return views.select(kind, self.services(), query, workers)
        if kind == "endpoints":
            return views.select(kind, views.endpoint_rows(self.services()), query, workers)
        count = query.offset + query.limit
        numbers = views.port_numbers(self.store.services)
        if kind == "affinity":
            rows, total = views.affinity_rows(self.affinity_tables(), self.clock(), self.worker, numbers, query, count)
        elif kind == "connections":
            rows, total = views.connection_rows(self.connections(), self.table.ports, self.clock(),
                                                self.shutting_down(), self.worker, numbers, query, count)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return views.page(kind, rows, total, query, workers, ())

    def services(self) -> list[Row]:
        return views.service_rows(self.store.services, self.store.slices_of, self.table.ports, self.table.routes)

    def affinity_tables(self) -> dict[ServicePortName, AffinityView]:
        return {
            name: AffinityView(int(balancer.affinity.timeout), tuple(balancer.affinity.entries()))
            for name, balancer in self.table.balancers.items()
            if balancer.affinity is not None
        }
