"""Health decisions (pure, fake clock), the HTTP responder on in-memory streams, and the
health check servers' reconcile loop with a fake listener: no sockets in this tier."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.objects import Node, Service, ServiceKey, ServicePortName
from pyproxy.model.table import PortState
from pyproxy.observe import health
from pyproxy.observe.health import ProxyState, Response
from pyproxy.observe.http import Handler, _serve_one, parse_head, render
from pyproxy.observe.servers import HealthServers

TIMEOUT = 60.0
EPOCH = 1_700_000_000.0  # wall clock = monotonic + EPOCH in these tests
NODE = Node("node1", None, being_deleted=False, autoscaler_tainted=False)


def state(pending: float | None = None, last: float | None = None, node: Node | None = NODE) -> ProxyState:
    return ProxyState(pending_since=pending, last_success=last, node=node, timeout=TIMEOUT, epoch_offset=EPOCH)


# proxy health


def test_healthy_when_nothing_is_queued() -> None:
    r = health.healthz(100.0, state(None, last=None))
    assert r.status == 200
    body = r.json()
    assert body == {"lastUpdated": "2023-11-14T22:15:00.000000Z", "currentTime": "2023-11-14T22:15:00.000000Z",
                    "nodeEligible": True}
    assert dict(r.headers) == {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}


def test_queued_change_turns_unhealthy_only_after_the_timeout() -> None:
    s = state(pending=10.0, last=5.0)
    assert health.healthz(10.0 + TIMEOUT - 0.001, s).status == 200
    late = health.healthz(10.0 + TIMEOUT, s)
    assert late.status == 503
    assert health.livez(10.0 + TIMEOUT, s).status == 503
    # unhealthy answers report the last successful sync, not now
    assert late.json()["lastUpdated"] == health.wall_time(5.0, EPOCH)
    assert late.json()["currentTime"] == health.wall_time(70.0, EPOCH)


def test_healthy_answer_reports_now_as_last_updated() -> None:
    body = health.livez(50.0, state(pending=40.0, last=1.0)).json()
    assert body["lastUpdated"] == body["currentTime"] == health.wall_time(50.0, EPOCH)
    assert "nodeEligible" not in body


def test_never_synced_and_stale_reports_the_zero_time() -> None:
    body = health.healthz(100.0, state(pending=0.0, last=None)).json()
    assert body["lastUpdated"] == "0001-01-01T00:00:00Z"


@pytest.mark.parametrize("node", [
    Node("node1", None, being_deleted=True, autoscaler_tainted=False),
    Node("node1", "z1", being_deleted=False, autoscaler_tainted=True),
])
def test_healthz_fails_on_a_draining_node_but_livez_does_not(node: Node) -> None:
    r = health.healthz(1.0, state(node=node))
    assert r.status == 503 and r.json()["nodeEligible"] is False
    assert health.livez(1.0, state(node=node)).status == 200


def test_unknown_node_counts_as_eligible() -> None:
    assert health.healthz(1.0, state(node=None)).json()["nodeEligible"] is True


def test_unsynced_input_counts_as_queued_since_start() -> None:
    assert health.effective_pending(None, synced=True, started=3.0) is None
    assert health.effective_pending(7.0, synced=True, started=3.0) == 7.0
    assert health.effective_pending(None, synced=False, started=3.0) == 3.0
    assert health.effective_pending(7.0, synced=False, started=3.0) == 3.0


# per-Service health check


def key(name: str) -> ServiceKey:
    return ServiceKey("default", name)


def test_service_health_answer() -> None:
    r = health.service_health(key("web"), 2, proxy_is_healthy=True)
    assert r.status == 200
    assert r.json() == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2,
                        "serviceProxyHealthy": True}
    headers = dict(r.headers)
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert headers["Content-Type"] == "application/json"
    assert health.service_health(key("web"), 0, True).status == 503
    assert health.service_health(key("web"), 3, False).status == 503


def ep(ip: str, port: int = 80, local: bool = True, ready: bool = True, terminating: bool = False) -> Endpoint:
    return Endpoint(ip, port, ready=ready, serving=True, terminating=terminating, is_local=local)


def port_state(service: str, port_name: str, *endpoints: Endpoint) -> tuple[ServicePortName, PortState]:
    name = ServicePortName(key(service), port_name, "TCP")
    sets = EndpointSets(all=endpoints, cluster=endpoints, local=tuple(e for e in endpoints if e.is_local))
    return name, PortState(name, sets, None, internal_local=False, external_local=True)


def test_local_endpoint_counts_are_distinct_ready_local_ips() -> None:
    ports = dict([
        port_state("web", "http", ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3", local=False),
                   ep("10.0.0.4", ready=False), ep("10.0.0.5", ready=True, terminating=True)),
        port_state("web", "https", ep("10.0.0.1", 443), ep("10.0.0.6", 443)),
        port_state("db", "", ep("10.0.1.1", local=False)),
    ])
    assert health.local_endpoint_counts(ports) == {key("web"): 3, key("db"): 0}
    assert health.local_endpoint_counts(ports, only={key("web")}) == {key("web"): 3}


def test_a_dual_stack_pod_is_one_local_endpoint_not_two() -> None:
    ports = dict([
        port_state("dual", "http", ep("10.0.0.1"), ep("10.0.0.2"), ep("fd00::1"), ep("fd00::2")),
        port_state("v6", "http", ep("fd00::5"), ep("fd00::6"), ep("fd00::7", local=False)),
        port_state("half", "http", ep("10.0.0.9"), ep("10.0.0.10"), ep("fd00::9")),  # one pod's IPv6 not yet in
    ])
    assert health.local_endpoint_counts(ports) == {key("dual"): 2, key("v6"): 2, key("half"): 2}


def svc(name: str, hc_port: int | None, type: str = "LoadBalancer", local: bool = True) -> Service:
    return Service(key(name), type, ("10.96.0.1",), (), (), (), None, local, False, hc_port)


def test_desired_health_checks() -> None:
    plan = health.desired_health_checks([
        svc("b", 30001), svc("a", 30001), svc("c", 30002), svc("d", None), svc("e", 30003, type="NodePort"),
        svc("f", 30004, local=False),
    ])
    assert plan.wanted == {30001: key("a"), 30002: key("c")}
    assert plan.conflicts == ((key("b"), 30001, key("a")),)


def test_reconcile_diff() -> None:
    close, start = health.reconcile({1: key("a"), 2: key("b"), 3: key("c")}, {1: key("a"), 2: key("x"), 4: key("d")})
    assert close == [2, 4]
    assert start == [(2, key("b")), (3, key("c"))]


# HTTP responder, on in-memory streams


class FakeWriter:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


async def exchange(handler: Handler, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader = asyncio.StreamReader(limit=16 * 1024)
    reader.feed_data(request)
    reader.feed_eof()
    writer = FakeWriter()
    await _serve_one(handler, reader, writer)  # type: ignore[arg-type]
    assert writer.closed
    head, _, body = writer.data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def echo_handler(method: str, path: str) -> Response:
    return Response(200, json.dumps([method, path]).encode(), (("Content-Type", "application/json"),))


async def test_http_answers_one_request_and_closes() -> None:
    status, headers, body = await exchange(echo_handler, b"GET /healthz?x=1 HTTP/1.1\r\nHost: n\r\n\r\n")
    assert status == 200
    assert json.loads(body) == ["GET", "/healthz"]
    assert headers["Connection"] == "close" and headers["Content-Length"] == str(len(body))


async def test_http_reads_a_post_body_and_head_gets_no_body() -> None:
    status, _, body = await exchange(echo_handler, b"POST /x HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
    assert status == 200 and json.loads(body) == ["POST", "/x"]
    status, headers, body = await exchange(echo_handler, b"HEAD / HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


async def test_http_bad_requests() -> None:
    status, _, _ = await exchange(echo_handler, b"NONSENSE\r\n\r\n")
    assert status == 400
    # a client that hangs up mid-head gets nothing and costs nothing
    reader_only = await exchange_raw(echo_handler, b"GET / HTT")
    assert reader_only == b""

    def broken(method: str, path: str) -> Response:
        raise RuntimeError("boom")

    status, _, _ = await exchange(broken, b"GET / HTTP/1.1\r\n\r\n")
    assert status == 500


async def exchange_raw(handler: Handler, request: bytes) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(request)
    reader.feed_eof()
    writer = FakeWriter()
    await _serve_one(handler, reader, writer)  # type: ignore[arg-type]
    return writer.data


def test_parse_and_render() -> None:
    assert parse_head(b"GET /a?b HTTP/1.1\r\ncontent-length: 5\r\n\r\n") == ("GET", "/a", 5)
    with pytest.raises(ValueError):
        parse_head(b"GET / SPDY/3\r\n\r\n")
    text = render(Response(503, b"{}", (("A", "b"),)))
    assert text.startswith(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\nContent-Length: 2\r\n")
    assert text.endswith(b"\r\n\r\n{}")


# the servers' edge, with a fake listener


class FakeServer:
    def __init__(self, port: int, handler: Handler) -> None:
        self.port = port
        self.handler = handler
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


class FakeListen:
    def __init__(self) -> None:
        self.busy: set[int] = set()
        self.servers: dict[int, FakeServer] = {}

    async def __call__(self, host: str, port: int, handler: Handler) -> FakeServer:
        if port in self.busy:
            raise OSError(98, "Address already in use")
        server = self.servers[port] = FakeServer(port, handler)
        return server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_servers(pending: list[float | None]) -> tuple[HealthServers, FakeListen, Clock, list[tuple[str, int]]]:
    listen, clock, answers = FakeListen(), Clock(), []
    servers = HealthServers(
        lambda: state(pending=pending[0]), clock=clock, answered=lambda e, c: answers.append((e, c)), listen=listen,
    )
    return servers, listen, clock, answers


async def test_proxy_health_paths() -> None:
    pending: list[float | None] = [None]
    servers, listen, clock, answers = make_servers(pending)
    await servers.start_proxy_health("0.0.0.0", 10256)
    handler = listen.servers[10256].handler
    assert handler("GET", "/healthz").status == 200
    assert handler("GET", "/nope").status == 404
    pending[0] = clock.now - TIMEOUT - 1
    assert handler("GET", "/livez").status == 503
    assert answers == [("healthz", 200), ("livez", 503)]
    await servers.close()
    assert listen.servers[10256].closed


async def test_health_check_servers_follow_services_and_retry_busy_ports(caplog: Any) -> None:
    pending: list[float | None] = [None]
    servers, listen, clock, _ = make_servers(pending)
    ports = dict([port_state("web", "", ep("10.0.0.1"), ep("10.0.0.2")), port_state("api", "", ep("10.0.0.9", local=False))])
    listen.busy.add(30002)
    servers.update([svc("web", 30001), svc("api", 30002)], ports)
    await servers.reconcile()
    assert set(listen.servers) == {30001}
    assert "default/api" in caplog.text and "30002" in caplog.text
    web = listen.servers[30001].handler("POST", "/anything")
    assert web.status == 200 and web.json()["localEndpoints"] == 2

    # the port frees up: the next sync's reconcile opens it
    listen.busy.clear()
    servers.update([svc("web", 30001), svc("api", 30002)], ports)
    await servers.reconcile()
    api = listen.servers[30002].handler("GET", "/")
    assert api.status == 503 and api.json()["localEndpoints"] == 0

    # the proxy goes stale: every check says so
    pending[0] = clock.now - TIMEOUT
    stale = listen.servers[30001].handler("GET", "/")
    assert stale.status == 503 and stale.json()["serviceProxyHealthy"] is False
    pending[0] = None

    # web's pods move away (counts change at once), api leaves, web changes port
    moved = dict([port_state("web", "", ep("10.0.0.1", local=False))])
    servers.update([svc("web", 30001)], moved)
    assert listen.servers[30001].handler("GET", "/").status == 503
    await servers.reconcile()
    assert listen.servers[30002].closed and not listen.servers[30001].closed
    servers.update([svc("web", 30005)], moved)
    await servers.reconcile()
    assert listen.servers[30001].closed and set(servers.checks) == {30005}
    await servers.close()
    assert listen.servers[30005].closed


async def test_run_reconciles_on_nudge_and_stops() -> None:
    servers, listen, _, _ = make_servers([None])
    stop = asyncio.Event()
    task = asyncio.create_task(servers.run(stop))
    servers.update([svc("web", 30001)], {})
    for _ in range(100):
        await asyncio.sleep(0)
        if 30001 in listen.servers:
            break
    assert 30001 in listen.servers
    stop.set()
    await asyncio.wait_for(task, 1.0)
    await servers.close()
