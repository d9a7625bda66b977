"""Prometheus metrics: kube-proxy's names where the meaning carries over, pyproxy_* for the rest.

Rules kept here:
- One private `CollectorRegistry` per proxy (tests run several in one process).
- `pyproxy_tcp_relay_info{relay}` is 1 for the TCP byte path this process runs: "engine"
  (engine.c) or "twin" (splice.py, where the engine is not built or PYPROXY_PURE_PYTHON=1), so
  a node that fell back to the slower twin shows in a scrape, not only in its start-up log.
- Nothing is counted per packet or per connection here: the data plane bumps plain integers
  (`DataplaneStats`, `AffinityStats`) and the collectors read them, with the service table's
  balancers, only when /metrics is scraped. Scrapes run on the event loop, so they see a
  consistent table.
- `CountingStore` is the cluster store plus kube-proxy's change counters: a Service or
  EndpointSlice update that changes something counts once in `*_changes_total` and puts its
  Service in `*_changes_pending` until a sync takes the changes.
- Network programming latency is measured from an EndpointSlice's
  `endpoints.kubernetes.io/last-change-trigger-time` to the end of the sync that applied that
  slice, observed once per slice change, only after a successful sync; triggers older than
  the proxy's start (the first list) or repeated unchanged are not observed.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.model.family import join_host_port
from pyproxy.model.objects import EndpointSlice, Service, ServiceKey, ServicePortName
from pyproxy.model.store import ClusterStore, SliceKey
from pyproxy.model.table import ServiceTable
from pyproxy.observe.health import Response

SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))  # 1 ms .. ~16 s, as kube-proxy
PROGRAMMING_BUCKETS = (
    (0.0, 0.25, 0.5)
    + tuple(float(s) for s in range(1, 60))
    + tuple(float(s) for s in range(60, 120, 5))
    + tuple(float(s) for s in range(120, 301, 30))
)
PORT_LABELS = ("namespace", "service", "port_name", "protocol")


def parse_trigger_time(text: str | None) -> float | None:
    """An RFC 3339 timestamp (nanoseconds allowed) as Unix seconds; None if absent or bad."""
    if not text:
        return None
    value = text.strip().replace("Z", "+00:00")
    head, dot, rest = value.partition(".")
    if dot:  # Python takes at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        value = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        stamp = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


class CountingStore(ClusterStore):
    """A `ClusterStore` that also keeps kube-proxy's change counters (see module doc)."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.started = wall_clock()
        self.service_changes_total = 0
        self.endpoint_changes_total = 0
        self.pending_services: set[ServiceKey] = set()
        self.pending_endpoints: set[ServiceKey] = set()
        self._triggers: list[float] = []  # changes not yet taken by a sync
        self._applying: list[float] = []  # taken by a sync, not yet applied successfully

    def upsert_service(self, key: ServiceKey, service: Service | None) -> None:
        if self.services.get(key) != service:
            self.service_changes_total += 1
            self.pending_services.add(key)
        super().upsert_service(key, service)

    def upsert_slice(self, key: SliceKey, endpoint_slice: EndpointSlice | None) -> None:
        previous = self.slices.get(key)
        if previous != endpoint_slice:
            self.endpoint_changes_total += 1
            self.pending_endpoints.update(s.service for s in (previous, endpoint_slice) if s is not None)
            self._record_trigger(previous, endpoint_slice)
        super().upsert_slice(key, endpoint_slice)

    def _record_trigger(self, previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
        if current is None or current.trigger_time is None:
            return
        if previous is not None and previous.trigger_time == current.trigger_time:
            return
        trigger = parse_trigger_time(current.trigger_time)
        if trigger is not None and trigger >= self.started:
            self._triggers.append(trigger)

    def take_changes(self) -> set[ServiceKey]:
        self.pending_services.clear()
        self.pending_endpoints.clear()
        self._applying.extend(self._triggers)
        self._triggers.clear()
        return super().take_changes()

    def take_applied_triggers(self) -> list[float]:
        """Trigger times of the slice changes the last successful sync applied."""
        applied, self._applying = self._applying, []
        return applied


class ChangesCollector(Collector):
    def __init__(self, store: CountingStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        s = self.store
        prefix = "kubeproxy_sync_proxy_rules_"
        yield GaugeMetricFamily(prefix + "service_changes_pending", "Pending proxy rules Service changes",
                                value=len(s.pending_services))
        yield CounterMetricFamily(prefix + "service_changes_total", "Cumulative proxy rules Service changes",
                                  value=s.service_changes_total)
        yield GaugeMetricFamily(prefix + "endpoint_changes_pending", "Pending proxy rules Endpoint changes",
                                value=len(s.pending_endpoints))
        yield CounterMetricFamily(prefix + "endpoint_changes_total", "Cumulative proxy rules Endpoint changes",
                                  value=s.endpoint_changes_total)


class TableCollector(Collector):
    """Read at scrape time from the service table: Local policies left without a local endpoint,
    and the affinity tables of the balancers."""

    def __init__(self, table: ServiceTable) -> None:
        self.table = table

    def collect(self) -> Iterable[Metric]:
        no_local = GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of service ports with a Local traffic policy and no local endpoint",
            labels=["traffic_policy"],
        )
        internal = external = 0
        for state in self.table.ports.values():
            if not state.endpoints.local:
                internal += state.internal_local
                external += state.external_local
        no_local.add_metric(["internal"], internal)
        no_local.add_metric(["external"], external)
        yield no_local
        entries = GaugeMetricFamily("pyproxy_affinity_entries", "ClientIP affinity table entries",
                                    labels=PORT_LABELS)
        hits = CounterMetricFamily("pyproxy_affinity_hits", "New connections sent to their pinned endpoint",
                                   labels=PORT_LABELS)
        misses = CounterMetricFamily("pyproxy_affinity_misses",
                                     "New connections whose pin was missing, stale or unusable",
                                     labels=PORT_LABELS)
        evictions = CounterMetricFamily("pyproxy_affinity_evictions",
                                        "Affinity entries evicted because the table was full", labels=PORT_LABELS)
        for name, balancer in sorted(self.table.balancers.items()):
            affinity = balancer.affinity
            if affinity is None:
                continue
            labels = _port_labels(name)
            entries.add_metric(labels, len(affinity))
            hits.add_metric(labels, affinity.stats.hits)
            misses.add_metric(labels, affinity.stats.misses)
            evictions.add_metric(labels, affinity.stats.evictions)
        yield from (entries, hits, misses, evictions)


class DataplaneCollector(Collector):
    def __init__(self, stats: DataplaneStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        self.stats.refresh()
        active = GaugeMetricFamily("pyproxy_connections_active", "Open proxied connections", labels=PORT_LABELS)
        total = CounterMetricFamily("pyproxy_connections", "Proxied connections accepted", labels=PORT_LABELS)
        refused = CounterMetricFamily("pyproxy_connections_refused",
                                      "Connections refused because no endpoint could be reached",
                                      labels=PORT_LABELS)
        moved = CounterMetricFamily("pyproxy_bytes", "Bytes relayed", labels=(*PORT_LABELS, "direction"))
        datagrams = CounterMetricFamily("pyproxy_datagrams", "UDP datagrams relayed",
                                        labels=(*PORT_LABELS, "direction"))
        for name, port in sorted(self.stats.ports.items()):
            labels = _port_labels(name)
            active.add_metric(labels, port.active)
            total.add_metric(labels, port.total)
            refused.add_metric(labels, port.refused)
            moved.add_metric([*labels, "to_endpoint"], port.bytes_in)
            moved.add_metric([*labels, "to_client"], port.bytes_out)
            if name.protocol == "UDP":
                datagrams.add_metric([*labels, "to_endpoint"], port.datagrams_in)
                datagrams.add_metric([*labels, "to_client"], port.datagrams_out)
        dials = CounterMetricFamily("pyproxy_endpoint_dial_failures", "Failed dials to an endpoint",
                                    labels=(*PORT_LABELS, "endpoint"))
        for (name, (ip, number)), count in sorted(self.stats.dial_failures.items()):
            dials.add_metric([*_port_labels(name), join_host_port(ip, number)], count)
        unknown = CounterMetricFamily("pyproxy_unknown_destination",
                                      "Captured connections to an address no service port owns (closed at once)",
                                      value=self.stats.unknown_destination)
        errors = CounterMetricFamily("pyproxy_connection_errors",
                                     "Connection errors by stage and error (logged at a bounded rate)",
                                     labels=["stage", "error"])
        for (stage, error), count in sorted(self.stats.connection_errors.items()):
            errors.add_metric([stage, error], count)
        udp = self.stats.udp
        drops = CounterMetricFamily("pyproxy_udp_drops", "UDP datagrams not forwarded, by reason", labels=["reason"])
        for reason, count in sorted(udp.drops.items()):
            drops.add_metric([reason], count)
        closed = CounterMetricFamily("pyproxy_udp_flows_closed", "UDP flows ended, by reason", labels=["reason"])
        for reason, count in sorted(udp.flows_closed.items()):
            closed.add_metric([reason], count)
        yield from (active, total, refused, moved, datagrams, dials, unknown, errors, drops, closed)


def _port_labels(name: ServicePortName) -> list[str]:
    return [name.service.namespace, name.service.name, name.port_name, name.protocol]


class ProxyMetrics:
    """The registry of one proxy, and the few metrics updated by events rather than scrapes."""

    def __init__(
        self,
        store: CountingStore,
        table: ServiceTable,
        stats: DataplaneStats,
        wall_clock: Callable[[], float] = time.time,
        relay: str = "",
    ) -> None:
        self.store = store
        self.wall_clock = wall_clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
                                       buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=r)
        self.programming = Histogram("kubeproxy_network_programming_duration_seconds",
                                     "In Cluster Network Programming Latency in seconds",
                                     buckets=PROGRAMMING_BUCKETS, registry=r)
        self.healthz = Counter("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status",
                               ["code"], registry=r)
        self.livez = Counter("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        for collector in (ChangesCollector(store), TableCollector(table), DataplaneCollector(stats)):
            r.register(collector)
        if relay:  # which TCP byte path serves: "engine", or "twin" where the engine is not built
            Gauge("pyproxy_tcp_relay_info", "The TCP relay serving (1 per process): the compiled engine or its "
                  "pure-Python twin", ["relay"], registry=r).labels(relay=relay).set(1)

    def synced(self, seconds: float) -> None:
        """A sync succeeded: its duration, its time, and the slice changes it applied."""
        now = self.wall_clock()
        self.sync_duration.observe(seconds)
        self.last_sync.set(now)
        for trigger in self.store.take_applied_triggers():
            self.programming.observe(max(0.0, now - trigger))

    def answered(self, endpoint: str, code: int) -> None:
        counter = self.healthz if endpoint == "healthz" else self.livez
        counter.labels(code=str(code)).inc()

    def answer(self, method: str, path: str) -> Response:
        if path != "/metrics":
            return Response(404, b"404 page not found\n", (("Content-Type", "text/plain; charset=utf-8"),))
        return Response(200, self.exposition(), (("Content-Type", CONTENT_TYPE_LATEST),))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
