"""The inspection API's pure views and tables: model and counters in, JSON rows and text out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.demo import manifests as m
from pyproxy.inspect import tables, views
from pyproxy.inspect.views import AffinityView, Query, QueryError
from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.objects import ServiceKey, ServicePortName, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import PortState, ServiceTable

NODE = "node1"
WEB = ServicePortName(ServiceKey("default", "web"), "http", "TCP")
DNS = ServicePortName(ServiceKey("kube-system", "kube-dns"), "dns", "UDP")


def model(*docs: dict[str, Any], node_addresses: tuple[str, ...] = ("192.168.56.101",)) -> tuple[ClusterStore, ServiceTable]:
    store = ClusterStore()
    for doc in docs:
        if doc["kind"] == "Service":
            service = parse_service(doc)
            assert service is not None
            store.upsert_service(service.key, service)
        else:
            endpoint_slice = parse_endpoint_slice(doc)
            assert endpoint_slice is not None
            store.upsert_slice(endpoint_slice.key, endpoint_slice)
    table = ServiceTable(NODE)
    table.update(store.take_changes(), store, node_addresses)
    return store, table


def rows_of(store: ClusterStore, table: ServiceTable) -> list[dict[str, Any]]:
    return views.service_rows(store.services, store.slices_of, table.ports, table.routes)


def test_a_service_port_row_names_its_frontends_policies_affinity_and_endpoint_sets() -> None:
    store, table = model(
        m.service("web", "10.96.0.10", [m.port(80, 8080, name="http", node_port=30080)], type="LoadBalancer",
                  external_policy="Local", affinity_timeout=10, external_ips=["203.0.113.7"], lb_ips=["198.51.100.1"]),
        m.endpoint_slice("web", [m.Backend("10.244.1.2", "node1"), m.Backend("10.244.2.2", "node2"),
                                 m.Backend("10.244.1.3", "node1", ready=False, serving=True, terminating=True)],
                         [m.slice_port(8080, name="http")]),
    )
    [row] = rows_of(store, table)
    assert {k: row[k] for k in ("namespace", "service", "portName", "protocol", "port", "type")} == {
        "namespace": "default", "service": "web", "portName": "http", "protocol": "TCP", "port": 80,
        "type": "LoadBalancer"}
    assert row["clusterIPs"] == ["10.96.0.10"] and row["externalIPs"] == ["203.0.113.7"]
    assert row["loadBalancerIPs"] == ["198.51.100.1"]
    assert (row["nodePort"], row["nodePortAddresses"]) == (30080, ["192.168.56.101"])
    assert (row["internalTrafficPolicy"], row["externalTrafficPolicy"]) == ("Cluster", "Local")
    assert (row["sessionAffinity"], row["affinityTimeoutSeconds"]) == ("ClientIP", 10)
    got = {e["address"]: (e["node"], e["ready"], e["terminating"], e["isLocal"], e["inClusterSet"], e["inLocalSet"])
           for e in row["endpoints"]}
    assert got == {
        "10.244.1.2:8080": ("node1", True, False, True, True, True),
        "10.244.2.2:8080": ("node2", True, False, False, True, False),
        "10.244.1.3:8080": ("node1", False, True, True, False, False),  # terminating: in no set while others are ready
    }


def test_endpoint_rows_flatten_services_in_a_fixed_order() -> None:
    store, table = model(
        m.service("b", "10.96.0.2", [m.port(80, 80)]),
        m.endpoint_slice("b", [m.Backend("10.244.1.10", "node1"), m.Backend("10.244.1.9", "node1")], [m.slice_port(80)]),
        m.service("a", "10.96.0.1", [m.port(80, 80)]),
        m.endpoint_slice("a", [m.Backend("10.244.2.2", "node2")], [m.slice_port(80)]),
    )
    rows = views.endpoint_rows(rows_of(store, table))
    assert [(r["service"], r["address"]) for r in rows] == [
        ("a", "10.244.2.2:80"), ("b", "10.244.1.9:80"), ("b", "10.244.1.10:80")]  # numeric, not string, order


def test_affinity_rows_give_age_and_time_left_and_leave_out_stale_pins() -> None:
    tables_ = {WEB: AffinityView(10, (("10.0.0.2", ("10.244.1.2", 80), 95.0), ("10.0.0.1", ("10.244.2.2", 80), 99.5),
                                      ("10.0.0.3", ("10.244.2.2", 80), 80.0)))}
    rows, total = views.affinity_rows(tables_, now=100.0, worker=1, numbers={WEB: 80})
    assert [(r["client"], r["endpoint"], r["age"], r["expiresIn"], r["port"], r["worker"]) for r in rows] == [
        ("10.0.0.1", "10.244.2.2:80", 0.5, 9.5, 80, 1),
        ("10.0.0.2", "10.244.1.2:80", 5.0, 5.0, 80, 1),
    ]
    assert total == 2


def test_big_tables_build_rows_only_for_the_page_but_count_every_match() -> None:
    entries = tuple((f"10.0.{i // 200}.{i % 200}", ("10.244.1.2", 80), 99.0) for i in range(5000))
    rows, total = views.affinity_rows({WEB: AffinityView(10, entries)}, now=100.0, count=3,
                                      query=Query(service="web"))
    assert total == 5000 and [r["client"] for r in rows] == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    rows, total = views.affinity_rows({WEB: AffinityView(10, entries)}, now=100.0, query=Query(client="10.0.7.9"))
    assert (total, [r["client"] for r in rows]) == (1, ["10.0.7.9"])
    assert views.affinity_rows({WEB: AffinityView(10, entries)}, now=100.0, query=Query(namespace="x")) == ([], 0)
    conns = [info(("10.244.1.2", 80))._replace(client=(f"10.0.0.{i % 250}", 1000 + i)) for i in range(1000)]
    rows, total = views.connection_rows(conns, {}, now=100.0, count=2, query=Query(client="10.0.0.7"))
    assert total == 4 and [r["client"] for r in rows] == ["10.0.0.7:1007", "10.0.0.7:1257"]


def port_state(name: ServicePortName, *addresses: tuple[str, int]) -> PortState:
    endpoints = tuple(Endpoint(ip, port, True, True, False, False) for ip, port in addresses)
    return PortState(name, EndpointSets(endpoints, endpoints, ()), None, False, False)


def info(endpoint: tuple[str, int] | None, *, client_done: bool = False, port: ServicePortName = WEB,
         protocol: str = "TCP") -> ConnectionInfo:
    return ConnectionInfo(protocol, port, ("10.0.0.1", 40000), ("10.96.0.10", 80), endpoint, 10, 20,
                          started=90.0, last_active=98.0, client_done=client_done)


@pytest.mark.parametrize(("connection", "shutting_down", "state"), [
    (info(("10.244.1.2", 80)), False, "open"),
    (info(("10.244.1.2", 80), client_done=True), False, "half-closed"),
    (info(None), False, "connecting"),
    (info(("10.244.9.9", 80)), False, "draining"),  # its endpoint left the service port
    (info(("10.244.1.2", 80), port=DNS, protocol="UDP"), False, "draining"),  # the port itself is gone
    (info(("10.244.1.2", 80)), True, "draining"),  # the proxy is shutting down
])
def test_connection_state(connection: ConnectionInfo, shutting_down: bool, state: str) -> None:
    ports = {WEB: port_state(WEB, ("10.244.1.2", 80))}
    assert views.connection_state(connection, ports, shutting_down) == state


def test_connection_rows_carry_bytes_each_way_and_ages() -> None:
    ports = {WEB: port_state(WEB, ("10.244.1.2", 80))}
    [row], total = views.connection_rows([info(("10.244.1.2", 80))], ports, now=100.0, worker=2)
    assert total == 1
    assert row == {"namespace": "default", "service": "web", "portName": "http", "protocol": "TCP", "port": None,
                   "client": "10.0.0.1:40000", "frontend": "10.96.0.10:80", "endpoint": "10.244.1.2:80",
                   "bytesToEndpoint": 10, "bytesToClient": 20, "age": 10.0, "idle": 2.0, "state": "open",
                   "worker": 2}
    json.dumps(row)


@pytest.mark.parametrize(("params", "expected"), [
    ({}, Query()),
    ({"namespace": "kube-system", "service": "kube-dns", "client": "10.0.0.1", "offset": "5", "limit": "7"},
     Query("kube-system", "kube-dns", "10.0.0.1", 5, 7)),
    ({"limit": "", "namespace": ""}, Query()),
    ({"client": "FD00:56:0::100"}, Query(client="fd00:56::100")),  # compared canonically
])
def test_parse_query(params: dict[str, str], expected: Query) -> None:
    assert views.parse_query(params) == expected
    assert views.parse_query(views.query_params(expected)) == expected


@pytest.mark.parametrize(("params", "message"), [
    ({"limit": "-1"}, "limit: '-1' is not a non-negative integer"),
    ({"offset": "x"}, "offset: 'x' is not a non-negative integer"),
    ({"limit": str(views.MAX_LIMIT + 1)}, f"limit: {views.MAX_LIMIT + 1} is above the maximum"),
    ({"namespce": "a"}, "namespce: unknown parameter"),
    ({"client": "fd00::zz"}, "client: 'fd00::zz' is not an IP address"),
])
def test_bad_queries_name_the_parameter(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        views.parse_query(params)


def test_ipv6_connection_rows_bracket_their_addresses() -> None:
    ports = {WEB: port_state(WEB, ("fd00:244:1::2", 80))}
    item = ConnectionInfo("TCP", WEB, ("fd00:56::100", 40000), ("fd00:96::10", 80), ("fd00:244:1::2", 80),
                                10, 20, 90.0, 98.0)
    [row], _ = views.connection_rows([item], ports, now=100.0, worker=0)
    assert (row["client"], row["frontend"], row["endpoint"]) == (
        "[fd00:56::100]:40000", "[fd00:96::10]:80", "[fd00:244:1::2]:80")


def test_ip_key_orders_numerically_ipv4_before_ipv6() -> None:
    ips = ["fd00::10", "10.0.0.10", "fd00::9", "10.0.0.9"]
    assert sorted(ips, key=views.ip_key) == ["10.0.0.9", "10.0.0.10", "fd00::9", "fd00::10"]


def pin(namespace: str, service: str, client: str, worker: int = 0) -> dict[str, Any]:
    return {"namespace": namespace, "service": service, "portName": "", "protocol": "TCP", "client": client,
            "worker": worker}


@pytest.mark.parametrize(("query", "clients"), [
    (Query(), ["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.10"]),
    (Query(namespace="a"), ["10.0.0.1", "10.0.0.2", "10.0.0.10"]),
    (Query(service="b/web"), ["10.0.0.9"]),
    (Query(service="web"), ["10.0.0.1", "10.0.0.9"]),
    (Query(client="10.0.0.1"), ["10.0.0.1"]),
])
def test_filters(query: Query, clients: list[str]) -> None:
    rows = sorted([pin("a", "web", "10.0.0.1"), pin("a", "db", "10.0.0.2"), pin("b", "web", "10.0.0.9"),
                   pin("a", "db", "10.0.0.10")], key=views.sort_key("affinity"))
    got = views.select("affinity", rows, query)["items"]
    assert sorted(r["client"] for r in got) == sorted(clients)


def test_a_client_filter_matches_the_ip_not_a_prefix() -> None:
    row = {**pin("a", "web", "10.0.0.10:5555")}
    assert not views.matches(row, Query(client="10.0.0.1"))
    assert views.matches(row, Query(client="10.0.0.10"))


def test_pages_are_bounded_and_say_where_to_go_on() -> None:
    rows = [pin("a", "web", f"10.0.0.{i}") for i in range(1, 8)]
    first = views.select("affinity", rows, Query(limit=3))
    assert (first["total"], first["next"], len(first["items"])) == (7, 3, 3)
    last = views.select("affinity", rows, Query(offset=6, limit=3))
    assert (last["next"], [r["client"] for r in last["items"]]) == (None, ["10.0.0.7"])


def test_pages_from_several_workers_merge_into_one_sorted_page() -> None:
    worker0 = [pin("a", "web", f"10.0.0.{i}", 0) for i in (1, 4, 5)]
    worker1 = [pin("a", "web", f"10.0.0.{i}", 1) for i in (2, 3, 6)]
    everything = sorted(worker0 + worker1, key=views.sort_key("affinity"))
    query = Query(offset=2, limit=2)
    wide = Query(offset=0, limit=4)
    pages = [views.select("affinity", worker0, wide), {**views.select("affinity", worker1, wide), "errors": ["x"]}]
    merged = views.merge("affinity", pages, query, workers=3, errors=["worker 2: no answer"])
    assert [r["client"] for r in merged["items"]] == [r["client"] for r in everything[2:4]]
    assert (merged["total"], merged["next"], merged["workers"]) == (6, 4, 3)
    assert merged["errors"] == ["worker 2: no answer", "x"]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (60, "1m"), (192, "3m12s"), (3600, "1h"), (7500, "2h5m"), (86400, "1d"),
    (97200, "1d3h"), (None, "<none>"),
])
def test_ages_print_as_kubectl_does(seconds: float | None, text: str) -> None:
    assert tables.age(seconds) == text


def test_tables_align_columns_and_wide_adds_columns() -> None:
    ports = {WEB: port_state(WEB, ("10.244.1.2", 80))}
    rows, _ = views.connection_rows([info(("10.244.1.2", 80))], ports, now=100.0)
    page = views.select("connections", rows, Query())
    normal = tables.render_page("connections", page).splitlines()
    assert normal[0].split() == ["NAMESPACE", "SERVICE", "PORT", "CLIENT", "ENDPOINT", "STATE", "AGE",
                                 "TO-ENDPOINT", "TO-CLIENT"]
    assert normal[1].split() == ["default", "web", "TCP(http)", "10.0.0.1:40000", "10.244.1.2:80", "open", "10s",
                                 "10", "20"]
    assert normal[0].index("CLIENT") == normal[1].index("10.0.0.1")  # columns line up
    wide = tables.render_page("connections", page, wide=True).splitlines()
    assert wide[0].split()[-3:] == ["FRONTEND", "IDLE", "WORKER"] and wide[1].split()[-3:] == ["10.96.0.10:80",
                                                                                              "2s", "0"]


def test_an_empty_or_partial_page_says_so() -> None:
    assert tables.render_page("affinity", views.select("affinity", [], Query())) == "No affinity found.\n"
    rows = [pin("a", "web", f"10.0.0.{i}") | {"endpoint": "10.244.1.2:80", "age": 1.0, "expiresIn": 2.0,
                                            "timeoutSeconds": 3, "port": 80} for i in range(1, 4)]
    page = views.select("affinity", rows, Query(limit=2), errors=["worker 1: no answer (timed out)"])
    lines = tables.render_page("affinity", page).splitlines()
    assert lines[-2:] == ["... 2 of 3 shown; more with --offset 2", "warning: worker 1: no answer (timed out)"]


def test_services_table() -> None:
    store, table = model(
        m.service("web", "10.96.0.10", [m.port(80, 8080, name="http", node_port=30080)], type="NodePort",
                  affinity_timeout=10800),
        m.endpoint_slice("web", [m.Backend("10.244.1.2", "node1"), m.Backend("10.244.2.2", "node2")],
                         [m.slice_port(8080, name="http")]),
    )
    text = tables.render_page("services", views.select("services", rows_of(store, table), Query()), wide=True)
    header, row = text.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "PORT", "TYPE", "CLUSTER-IP", "EXTERNAL", "ENDPOINTS", "LOCAL",
                              "AFFINITY", "NODEPORT-ADDRESSES", "INTERNAL-POLICY", "EXTERNAL-POLICY"]
    assert row.split() == ["default", "web", "80/TCP(http)", "NodePort", "10.96.0.10", "*:30080", "2/2", "1",
                           "ClientIP(3h)", "192.168.56.101", "Cluster", "Cluster"]
