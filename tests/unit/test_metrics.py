"""Metrics: the change counters, network programming latency, and the scrape-time collectors."""

from __future__ import annotations

import random

import pytest

from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.model.objects import EndpointSlice, ServiceKey, ServicePortName, parse_endpoint_slice, parse_service
from pyproxy.model.table import ServiceTable
from pyproxy.observe.aggregate import merge_exposition
from pyproxy.observe.metrics import CountingStore, ProxyMetrics, parse_trigger_time
from pyproxy.sync import SyncRunner

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
WEB = ServiceKey("default", "web")


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def service(name: str = "web", policy: str = "Cluster", affinity: bool = False, node_port: int | None = None) -> dict:
    spec: dict = {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": "10.96.0.10",
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, **({"nodePort": node_port} if node_port else {})}],
                  "externalTrafficPolicy": policy if node_port else None}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


def endpoint_slice(ips: list[str], trigger: str | None = None, node: str = "node1", name: str = "web-1") -> EndpointSlice:
    meta: dict = {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}}
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    parsed = parse_endpoint_slice({
        "metadata": meta, "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": node} for ip in ips],
    })
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(("text", "expected"), [
    ("2023-11-14T22:13:20Z", T0),
    ("2023-11-14T22:13:20.5Z", T0 + 0.5),
    ("2023-11-14T22:13:20.123456789Z", T0 + 0.123456),
    ("2023-11-14T23:13:20+01:00", T0),
    (None, None), ("", None), ("yesterday", None),
])
def test_parse_trigger_time(text: str | None, expected: float | None) -> None:
    value = parse_trigger_time(text)
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_change_counters_ignore_no_ops_and_clear_when_taken() -> None:
    store = CountingStore(WallClock())
    svc = parse_service(service())
    store.upsert_service(WEB, svc)
    store.upsert_service(WEB, svc)  # no-op
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.2"]))
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.2", "10.244.1.3"]))
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.2", "10.244.1.3"]))  # no-op
    assert (store.service_changes_total, store.endpoint_changes_total) == (1, 2)
    assert store.pending_services == store.pending_endpoints == {WEB}
    assert store.take_changes() == {WEB}
    assert not store.pending_services and not store.pending_endpoints
    store.upsert_slice(("default", "web-1"), None)
    assert store.endpoint_changes_total == 3 and store.pending_endpoints == {WEB}


def make(wall: WallClock) -> tuple[CountingStore, ServiceTable, DataplaneStats, ProxyMetrics]:
    store = CountingStore(wall)
    table = ServiceTable("node1", rng=random.Random(1))
    stats = DataplaneStats()
    return store, table, stats, ProxyMetrics(store, table, stats, wall_clock=wall)


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_network_programming_latency_is_observed_once_per_slice_change_after_a_sync() -> None:
    wall = WallClock()
    store, _, _, metrics = make(wall)
    # a trigger from before the proxy started (the first list) is not a latency of ours
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.2"], "2023-11-14T22:00:00Z"))
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.3"], "2023-11-14T22:13:21Z"))
    store.upsert_slice(("default", "web-2"), endpoint_slice(["10.244.1.4"], "2023-11-14T22:13:22Z", name="web-2"))
    # a change that keeps the old trigger time (not a new trigger) is not observed again
    store.upsert_slice(("default", "web-2"), endpoint_slice(["10.244.1.5"], "2023-11-14T22:13:22Z", name="web-2"))
    wall.now = T0 + 4
    metrics.synced(0.01)  # a sync that took no changes observes nothing
    assert value(metrics, "kubeproxy_network_programming_duration_seconds_count") == 0
    store.take_changes()
    wall.now = T0 + 5
    metrics.synced(0.02)
    assert value(metrics, "kubeproxy_network_programming_duration_seconds_count") == 2
    assert value(metrics, "kubeproxy_network_programming_duration_seconds_sum") == pytest.approx(4 + 3)
    assert value(metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert value(metrics, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == T0 + 5
    metrics.synced(0.02)
    assert value(metrics, "kubeproxy_network_programming_duration_seconds_count") == 2


def test_triggers_taken_by_a_failed_sync_wait_for_the_next_success() -> None:
    wall = WallClock()
    store, _, _, metrics = make(wall)
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.2"], "2023-11-14T22:13:21Z"))
    store.take_changes()  # this sync fails: no synced() call
    store.upsert_slice(("default", "web-1"), endpoint_slice(["10.244.1.3"], "2023-11-14T22:13:22Z"))
    store.take_changes()
    wall.now = T0 + 10
    metrics.synced(0.01)
    assert value(metrics, "kubeproxy_network_programming_duration_seconds_count") == 2


def test_kube_proxy_names_and_health_counters_are_exposed() -> None:
    wall = WallClock()
    store, _, _, metrics = make(wall)
    store.upsert_service(WEB, parse_service(service()))
    metrics.answered("healthz", 200)
    metrics.answered("healthz", 200)
    metrics.answered("livez", 503)
    response = metrics.answer("GET", "/metrics")
    assert response.status == 200
    assert dict(response.headers)["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket", "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_total", "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total", "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_proxy_healthz_total", "kubeproxy_proxy_livez_total",
    ):
        assert f"\n{name}" in text, name
    assert value(metrics, "kubeproxy_proxy_healthz_total", code="200") == 2
    assert value(metrics, "kubeproxy_proxy_livez_total", code="503") == 1
    assert value(metrics, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert value(metrics, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert metrics.answer("GET", "/other").status == 404


def test_no_local_endpoints_by_traffic_policy() -> None:
    wall = WallClock()
    store, table, _, metrics = make(wall)
    store.replace_all([parse_service(service(policy="Local", node_port=30080))],  # type: ignore[list-item]
                      [endpoint_slice(["10.244.2.2"], node="node2")])
    table.update(store.take_changes(), store, ["192.168.56.101"])
    assert value(metrics, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 1
    assert value(metrics, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal") == 0
    store.replace_all([parse_service(service(policy="Local", node_port=30080))],  # type: ignore[list-item]
                      [endpoint_slice(["10.244.1.2"], node="node1")])
    table.update(store.take_changes(), store, ["192.168.56.101"])
    assert value(metrics, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 0


def test_dataplane_counters_are_read_at_scrape_time() -> None:
    wall = WallClock()
    store, table, stats, metrics = make(wall)
    store.replace_all([parse_service(service(affinity=True))], [endpoint_slice(["10.244.1.2"])])  # type: ignore[list-item]
    table.update(store.take_changes(), store, [])
    name = ServicePortName(WEB, "http", "TCP")
    port = stats.port(name)
    port.active, port.total, port.bytes_in, port.bytes_out, port.refused = 1, 5, 100, 2000, 2
    stats.dial_failed(name, ("10.244.1.9", 8080))
    stats.unknown_destination = 3
    stats.udp.drops["no_endpoint"] += 4
    balancer = table.balancers[name]
    candidates = table.ports[name].endpoints.cluster
    for now in (1.0, 2.0):
        balancer.pick("192.168.56.100", candidates, now)
    labels = {"namespace": "default", "service": "web", "port_name": "http", "protocol": "TCP"}
    assert value(metrics, "pyproxy_connections_active", **labels) == 1
    assert value(metrics, "pyproxy_connections_total", **labels) == 5
    assert value(metrics, "pyproxy_connections_refused_total", **labels) == 2
    assert value(metrics, "pyproxy_bytes_total", direction="to_endpoint", **labels) == 100
    assert value(metrics, "pyproxy_bytes_total", direction="to_client", **labels) == 2000
    assert value(metrics, "pyproxy_endpoint_dial_failures_total", endpoint="10.244.1.9:8080", **labels) == 1
    assert value(metrics, "pyproxy_unknown_destination_total") == 3
    assert value(metrics, "pyproxy_udp_drops_total", reason="no_endpoint") == 4
    assert value(metrics, "pyproxy_affinity_entries", **labels) == 1
    assert value(metrics, "pyproxy_affinity_hits_total", **labels) == 1
    assert value(metrics, "pyproxy_affinity_misses_total", **labels) == 1
    assert value(metrics, "pyproxy_affinity_evictions_total", **labels) == 0
    port.total += 1  # moves without any call into the metrics
    assert value(metrics, "pyproxy_connections_total", **labels) == 6


def test_the_tcp_relay_serving_is_one_info_sample_summed_over_workers() -> None:
    wall = WallClock()
    store, table, stats = CountingStore(wall), ServiceTable("node1"), DataplaneStats()
    twin = ProxyMetrics(store, table, stats, wall_clock=wall, relay="twin")
    assert value(twin, "pyproxy_tcp_relay_info", relay="twin") == 1
    assert value(twin, "pyproxy_tcp_relay_info", relay="engine") is None
    assert value(make(wall)[3], "pyproxy_tcp_relay_info", relay="twin") is None  # no relay named: no sample
    text = twin.exposition().decode()
    merged = merge_exposition([text, text]).decode()  # --workers 2: worker 0 sums the pyproxy_* families
    assert 'pyproxy_tcp_relay_info{relay="twin"} 2.0' in merged.splitlines()


def test_registries_are_private() -> None:
    a, b = make(WallClock())[3], make(WallClock())[3]
    a.answered("healthz", 200)
    assert value(b, "kubeproxy_proxy_healthz_total", code="200") is None


async def test_sync_runner_reports_a_change_held_by_a_running_sync() -> None:
    held: list[float | None] = []
    runner: SyncRunner

    async def sync() -> None:
        held.append(runner.oldest_unapplied)

    runner = SyncRunner(sync, 0.0, 30.0, clock=lambda: 5.0)
    runner.request()
    assert runner.oldest_unapplied == 5.0
    assert await runner._run_once()
    assert held == [5.0] and runner.oldest_unapplied is None
