"""The debug API's routing and worker aggregation (fake peers), the /metrics merge, and the CLI's URLs."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.inspect import cli
from pyproxy.inspect.reader import ProxyReader
from pyproxy.observe.inspect_api import InspectApi, worker_socket_name
from pyproxy.inspect.views import parse_query
from pyproxy.model.objects import ServiceKey, ServicePortName
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable
from pyproxy.observe.aggregate import merge_exposition
from pyproxy.observe.http import split_target

WEB = ServicePortName(ServiceKey("default", "web"), "", "TCP")


def connection(client_port: int) -> ConnectionInfo:
    return ConnectionInfo("TCP", WEB, ("10.0.0.1", client_port), ("10.96.0.10", 80), ("10.244.1.2", 80), 1, 2,
                          started=0.0, last_active=0.0)


def api(connections: list[ConnectionInfo], peers: dict[str, Any], worker: int = 0) -> InspectApi:
    reader = ProxyReader(ClusterStore(), ServiceTable("node1"), lambda: connections, worker=worker, clock=lambda: 5.0)

    def fetch(name: str, target: str, timeout: float) -> tuple[int, bytes]:
        answer = peers[name]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(target)
        return answer  # type: ignore[no-any-return]

    return InspectApi(reader, lambda: b"", peers=list(peers), workers=len(peers) + 1, fetch=fetch)


async def test_routes_and_errors() -> None:
    a = api([], {})
    index = await a.answer("GET", "/debug", {})
    assert index.status == 200 and "/debug/connections" in index.json()["kinds"]  # type: ignore[operator]
    assert (await a.answer("GET", "/debug/nothing", {})).status == 404
    assert (await a.answer("GET", "/other", {})).status == 404
    assert (await a.answer("POST", "/debug/services", {})).status == 405
    bad = await a.answer("GET", "/debug/affinity", {"limit": "x"})
    assert bad.status == 400 and bad.json() == {"error": "limit: 'x' is not a non-negative integer"}
    a.debug = False
    assert (await a.answer("GET", "/debug/services", {})).status == 404


async def test_worker_zero_merges_every_workers_connections_and_reports_the_silent_one() -> None:
    asked: list[str] = []

    def peer(target: str) -> tuple[int, bytes]:
        asked.append(target)
        worker1 = api([connection(2), connection(4)], {}, worker=1)
        return 200, json.dumps(worker1.reader.page("connections", parse_query(split_target(target)[1]))).encode()

    a = api([connection(1), connection(3)], {worker_socket_name(7, 1): peer,
                                             worker_socket_name(7, 2): OSError("refused")})
    answer = await a.answer("GET", "/debug/connections", {"offset": "1", "limit": "2"})
    page = answer.json()
    assert [(i["client"], i["worker"]) for i in page["items"]] == [  # type: ignore[index]
        ("10.0.0.1:2", 1), ("10.0.0.1:3", 0)]
    assert (page["total"], page["next"], page["workers"]) == (4, 3, 3)
    assert page["errors"] == ["worker 2: no answer (refused)"]
    assert asked == ["/debug/connections?offset=0&limit=3"]  # each worker is asked for offset+limit rows


def exposition(connections: float, active: float, syncs: int) -> str:
    registry = CollectorRegistry()
    Counter("pyproxy_connections", "c", ["service"], registry=registry).labels("web").inc(connections)
    Gauge("pyproxy_connections_active", "a", ["service"], registry=registry).labels("web").set(active)
    histogram = Histogram("kubeproxy_sync_proxy_rules_duration_seconds", "s", registry=registry)
    for _ in range(syncs):
        histogram.observe(0.01)
    return generate_latest(registry).decode()


def sample(text: str, prefix: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_metrics_merge_sums_pyproxy_families_and_keeps_worker_zeros_others() -> None:
    merged = merge_exposition([exposition(3, 1, 2), exposition(5, 2, 2)]).decode()
    assert sample(merged, 'pyproxy_connections_total{service="web"}') == 8
    assert sample(merged, 'pyproxy_connections_active{service="web"}') == 3
    assert sample(merged, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2  # not 4: one model, one count
    assert merged.count("# TYPE pyproxy_connections_total counter") == 1
    assert merge_exposition([exposition(3, 1, 1)]).decode().count("pyproxy_connections_total{") == 1
    assert merge_exposition([]) == b""


@pytest.mark.parametrize(("target", "expected"), [
    ("/debug/affinity", ("/debug/affinity", {})),
    ("/debug/affinity?service=default%2Fweb&limit=5", ("/debug/affinity", {"service": "default/web", "limit": "5"})),
    ("/healthz?verbose", ("/healthz", {"verbose": ""})),
])
def test_split_target(target: str, expected: tuple[str, dict[str, str]]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(("address", "url"), [
    ("127.0.0.1:10249", "http://127.0.0.1:10249/debug/services?limit=500&offset=0"),
    ("0.0.0.0:9000", "http://127.0.0.1:9000/debug/services?limit=500&offset=0"),  # a wildcard bind: loopback
    (":9000", "http://127.0.0.1:9000/debug/services?limit=500&offset=0"),
    ("[::1]:10249", "http://[::1]:10249/debug/services?limit=500&offset=0"),  # IPv6: brackets both ways
    ("[::]:9000", "http://[::1]:9000/debug/services?limit=500&offset=0"),
    ("[fd00::5]:9000", "http://[fd00::5]:9000/debug/services?limit=500&offset=0"),
])
def test_cli_url(address: str, url: str) -> None:
    args = cli.build_parser().parse_args(["services", "--address", address])
    assert cli.debug_url(cli.metrics_address(args), "services", cli.request_params(args)) == url


def test_cli_reads_the_metrics_address_from_the_config(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\nmetricsBindAddress: 127.0.0.1:9999\n")
    args = cli.build_parser().parse_args(["affinity", "--config", str(config), "--client", "10.0.0.1"])
    assert cli.metrics_address(args) == "127.0.0.1:9999"
    assert cli.request_params(args) == {"client": "10.0.0.1", "limit": "500", "offset": "0"}
    assert cli.metrics_address(argparse.Namespace(address=None, config=None)) == "127.0.0.1:10249"


def test_cli_says_why_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["services", "--address", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "no answer from http://127.0.0.1:1/debug/services" in err and "is pyproxy running here" in err
