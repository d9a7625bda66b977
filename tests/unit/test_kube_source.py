"""The cluster source without an API server: watch decisions, backoff, framing, hand-off,
and the list-then-watch loop against a scripted fake transport."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pyproxy.model.objects import ServiceKey
from pyproxy.model.store import ClusterStore
from pyproxy.sources.kube import KubeSource, Watcher, handlers
from pyproxy.sources.kube_client import StatusError, WatchStream, client_configuration, master_url
from pyproxy.sources.kube_watch import (
    Backoff,
    Delete,
    Kind,
    Pending,
    Reconnect,
    Relist,
    Upsert,
    WatchState,
    WatchTiming,
    json_lines,
    watched_kinds,
)

# -- API-shaped objects ------------------------------------------------------------------------


def service(name: str, ip: str = "10.96.0.10", rv: str = "1", labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv, "labels": dict(labels or {})},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }


def endpoint_slice(name: str, service_name: str, ip: str = "10.244.1.2", rv: str = "1") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node1"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str, zone: str = "a", rv: str = "1") -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "resourceVersion": rv,
                                         "labels": {"topology.kubernetes.io/zone": zone}}}


def event(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": dict(obj)}


def gone(message: str = "too old resource version") -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": message}}


def a_list(items: list[dict[str, Any]], rv: str, cont: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return {"kind": "List", "metadata": meta, "items": items}


# -- selectors -------------------------------------------------------------------------------


def test_selectors_follow_kube_proxy() -> None:
    services, slices, this_node = watched_kinds("node1", None)
    assert services == Kind("Service", label_selector="!service.kubernetes.io/service-proxy-name")
    assert slices == Kind("EndpointSlice", label_selector="!service.kubernetes.io/headless")
    assert this_node == Kind("Node", field_selector="metadata.name=node1")


def test_a_proxy_name_lists_every_service_and_parsing_keeps_ours() -> None:
    services, _, _ = watched_kinds("node1", "pyproxy")
    assert services.label_selector is None
    parse = handlers("node1", "pyproxy")[0].value
    assert parse(service("mine", labels={"service.kubernetes.io/service-proxy-name": "pyproxy"})) is not None
    assert parse(service("theirs", labels={"service.kubernetes.io/service-proxy-name": "cilium"})) is None
    assert parse(service("plain")) is not None


# -- the watch state machine -----------------------------------------------------------------


def test_events_become_decisions_and_move_the_resource_version() -> None:
    state = WatchState()
    state.listed(a_list([], "100"))
    assert state.resource_version == "100"
    added = state.on_event(event("ADDED", service("a", rv="101")))
    assert isinstance(added, Upsert) and added.key == ("default", "a")
    assert isinstance(state.on_event(event("MODIFIED", service("a", rv="102"))), Upsert)
    assert isinstance(state.on_event(event("DELETED", service("a", rv="103"))), Delete)
    assert state.resource_version == "103"
    assert state.on_event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}}) is None
    assert state.resource_version == "150"


def test_gone_means_list_again_and_other_errors_mean_reconnect() -> None:
    state = WatchState()
    state.listed(a_list([], "100"))
    decision = state.on_event(gone())
    assert isinstance(decision, Relist) and "too old" in decision.reason
    assert state.resource_version is None
    state.listed(a_list([], "200"))
    other = state.on_event({"type": "ERROR", "object": {"code": 500, "message": "etcd down"}})
    assert isinstance(other, Reconnect) and "etcd down" in other.reason
    assert state.resource_version == "200"  # resume from where we were
    assert isinstance(state.on_status(410, ""), Relist)


@pytest.mark.parametrize("bad", [None, "x", {"type": "ADDED"}, {"type": "WEIRD", "object": {}}])
def test_malformed_events_reconnect(bad: Any) -> None:
    assert isinstance(WatchState().on_event(bad), Reconnect)


@pytest.mark.parametrize("obj", [{"metadata": {}}, {"metadata": ["x"]}, {"metadata": {"name": 5}}])
def test_an_event_about_a_nameless_object_is_skipped_not_replayed(obj: Any) -> None:
    """Reconnecting would replay the same event from the same resourceVersion forever."""
    from pyproxy.sources.kube_watch import Skip

    state = WatchState()
    state.resource_version = "1"
    assert isinstance(state.on_event({"type": "ADDED", "object": obj}), Skip)


# -- backoff, framing, hand-off -----------------------------------------------------------------


def test_backoff_grows_is_jittered_and_capped() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=0.5)
    rng = random.Random(7)
    for failures, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(base * 0.5 <= d <= min(10.0, base * 1.5) for d in delays)
        assert len(set(delays)) > 100  # jittered, not lockstep
    assert all(backoff.delay(50, rng) <= 10.0 for _ in range(100))


def test_server_watch_timeout_is_spread() -> None:
    timing = WatchTiming(watch_timeout=300)
    values = {timing.server_watch_timeout(random.Random(i)) for i in range(50)}
    assert min(values) >= 300 and max(values) < 600 and len(values) > 10


def test_json_lines_reframes_chunks() -> None:
    events = [event("ADDED", service(f"s{i}")) for i in range(3)]
    data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
    assert [json.loads(line) for line in json_lines(chunks)] == events
    assert list(json_lines([b'{"a":1}\n\n', b'{"b"', b":2}"])) == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(ValueError):
        list(json_lines([b"x" * 100], max_line=10))


def test_pending_coalesces_and_schedules_once() -> None:
    pending: Pending[str, int] = Pending()
    assert pending.change("a", 1) is True
    assert pending.change("a", 2) is False
    assert pending.change("b", None) is False
    assert pending.take() == (None, {"a": 2, "b": None})
    assert pending.take() == (None, {})
    assert pending.change("a", 3) is True
    assert pending.snapshot({"x": 9}) is False  # a snapshot replaces what was queued before it
    pending.change("y", 10)
    assert len(pending) == 2
    assert pending.take() == ({"x": 9}, {"y": 10})


# -- the loop against a scripted transport ------------------------------------------------------


class Stop(threading.Event):
    """A stop event whose waits return at once and are recorded (no real sleeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return self.is_set()


class FakeTransport:
    """Plays back lists and watch streams; sets `stop` when the script runs out."""

    def __init__(self, stop: threading.Event, lists: list[Any], watches: list[Any]) -> None:
        self.stop = stop
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str | None]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def _next(self, script: list[Any]) -> Any:
        if not script:
            self.stop.set()
            raise StatusError(503, "script over")
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]:
        self.calls.append(("list", continue_token))
        result: Mapping[str, Any] = self._next(self.lists)
        return result

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream:
        self.calls.append(("watch", resource_version))
        events = self._next(self.watches)
        yield from events

    def interrupt(self) -> None:
        pass

    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        self.events.append((namespace, dict(body)))

    def close(self) -> None:
        self.closed = True


def run_watcher(kind_index: int, lists: list[Any], watches: list[Any]) -> tuple[Watcher, FakeTransport, list[Any]]:
    stop = Stop()
    transport = FakeTransport(stop, lists, watches)
    handler = handlers("node1", None)[kind_index]
    delivered: list[Any] = []
    watcher = Watcher(handler, transport, lambda h: delivered.append(h.pending.take()), stop,
                      rng=random.Random(1))
    watcher.run()
    return watcher, transport, delivered


def test_list_pages_then_watch_from_the_list_version() -> None:
    watcher, transport, delivered = run_watcher(
        0,
        lists=[a_list([service("a")], "", cont="tok"), a_list([service("b", ip="10.96.0.11")], "100")],
        watches=[[event("ADDED", service("c", ip="10.96.0.12", rv="101"))]],
    )
    assert transport.calls[:4] == [("list", None), ("list", "tok"), ("watch", "100"), ("watch", "101")]
    snapshot, _ = delivered[0]
    assert snapshot is not None and set(snapshot) == {("default", "a"), ("default", "b")}
    assert delivered[1][1][("default", "c")].cluster_ips == ("10.96.0.12",)
    assert watcher.lists == 1


def test_gone_in_the_stream_lists_again_without_backoff() -> None:
    watcher, transport, delivered = run_watcher(
        0,
        lists=[a_list([service("a")], "100"), a_list([service("b")], "300")],
        watches=[[event("ADDED", service("x", rv="101")), gone()], []],
    )
    assert [c for c in transport.calls if c[0] == "watch"][:2] == [("watch", "100"), ("watch", "300")]
    assert watcher.lists == 2
    assert delivered[-1][0] is not None and set(delivered[-1][0]) == {("default", "b")}
    # no backoff for the 410; one for the empty watch (it ended at once), one at the script's end
    assert isinstance(watcher.stop, Stop) and len(watcher.stop.waits) == 2


def test_errors_back_off_and_resume_from_the_last_version() -> None:
    watcher, transport, _ = run_watcher(
        1,
        lists=[StatusError(500, "etcd unavailable"), ConnectionRefusedError("refused"),
               a_list([endpoint_slice("s1", "a")], "100")],
        watches=[OSError("reset by peer"), [event("MODIFIED", endpoint_slice("s1", "a", rv="120"))],
                 StatusError(410, "expired")],
    )
    assert isinstance(watcher.stop, Stop)
    waits = watcher.stop.waits
    assert len(waits) >= 3 and 0.4 <= waits[0] <= 1.2 and 0.8 <= waits[1] <= 2.4  # growing, jittered
    watches = [c for c in transport.calls if c[0] == "watch"]
    assert watches[:3] == [("watch", "100"), ("watch", "100"), ("watch", "120")]
    assert transport.calls.count(("list", None)) == 4  # 2 failures, 1 good, 1 after the 410


def test_a_watch_that_ends_at_once_backs_off_but_a_long_quiet_one_does_not() -> None:
    for elapsed, backoffs in ((0.0, 2), (30.0, 0)):
        stop = Stop()
        transport = FakeTransport(stop, [a_list([], "1")], [[], []])
        ticks = iter(range(0, 1000))
        watcher = Watcher(handlers("node1", None)[0], transport, lambda h: None, stop,
                          clock=lambda: next(ticks) * elapsed)
        watcher.run()
        assert len(stop.waits) == backoffs + 1  # + the end of the script


def test_invalid_objects_are_skipped_with_their_name(caplog: pytest.LogCaptureFixture) -> None:
    bad = service("broken")
    bad["spec"]["ports"][0]["protocol"] = "SCTP"
    with caplog.at_level(logging.ERROR, logger="pyproxy.kube"):
        _, _, delivered = run_watcher(0, lists=[a_list([bad, service("good")], "5")], watches=[])
    snapshot = delivered[0][0]
    assert snapshot[("default", "broken")] is None and snapshot[("default", "good")] is not None
    assert "Service default/broken" in caplog.text and "SCTP" in caplog.text


# -- applying to the store ------------------------------------------------------------------


def test_store_is_synced_only_after_services_and_slices_were_listed() -> None:
    store = ClusterStore()
    nudges: list[int] = []
    stop = threading.Event()
    source = KubeSource(store, lambda: nudges.append(1), FakeTransport(stop, [], []), "node1")
    services, slices, this_node = source.handlers
    this_node.pending.snapshot({("", "node1"): this_node.value(node("node1"))})
    source.apply(this_node)
    assert not store.synced and store.node is not None and store.node.zone == "a"
    services.pending.snapshot({})
    source.apply(services)
    assert not store.synced
    slices.pending.snapshot({})
    source.apply(slices)
    assert store.synced and nudges  # an empty cluster still gets its first sync
    before = len(nudges)
    services.pending.change(("default", "a"), services.value(service("a")))
    source.apply(services)
    assert ServiceKey("default", "a") in store.services and len(nudges) == before + 1
    store.take_changes()
    services.pending.change(("default", "a"), services.value(service("a", rv="9")))  # same content
    source.apply(services)
    assert len(nudges) == before + 1  # a no-op update does not nudge
    services.pending.snapshot({})  # a re-list without it removes it
    source.apply(services)
    assert ServiceKey("default", "a") not in store.services
    this_node.pending.change(("", "node1"), None)
    source.apply(this_node)
    assert store.node is None


async def test_threads_feed_the_loop_and_stop_when_cancelled() -> None:
    store = ClusterStore()
    synced = asyncio.Event()
    stop = threading.Event()
    release = threading.Event()

    class Blocking(FakeTransport):
        def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream:
            yield event("ADDED", service("late", ip="10.96.0.99", rv="2")) if kind.name == "Service" else \
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "2"}}}
            release.wait(5)  # like a quiet watch, until interrupt() releases it

        def interrupt(self) -> None:
            release.set()

    lists = {"Service": a_list([service("a")], "1"), "EndpointSlice": a_list([endpoint_slice("a-1", "a")], "1"),
             "Node": a_list([node("node1")], "1")}

    class PerKind(Blocking):
        def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]:
            return lists[kind.name]

    transport = PerKind(stop, [], [])
    source = KubeSource(store, lambda: synced.set() if store.synced else None, transport, "node1")
    task = asyncio.create_task(source.run(), name="kube-source")
    await asyncio.wait_for(synced.wait(), 5)
    for _ in range(100):
        if ServiceKey("default", "late") in store.services:
            break
        await asyncio.sleep(0.02)
    assert {k.name for k in store.services} == {"a", "late"} and store.node is not None
    assert sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("kube-watch-")) == [
        "kube-watch-EndpointSlice", "kube-watch-Node", "kube-watch-Service"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert transport.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("kube-watch-")]


# -- connecting ------------------------------------------------------------------------------


def test_master_url() -> None:
    assert master_url("10.0.0.1:6443") == "https://10.0.0.1:6443"
    assert master_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_master_overrides_the_kubeconfig_server(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "secret"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    cfg = client_configuration(str(kubeconfig), "")
    assert cfg.host == "https://127.0.0.1:6443" and "Bearer secret" in cfg.api_key.values()
    cfg = client_configuration(str(kubeconfig), "192.168.56.2:6443")
    assert cfg.host == "https://192.168.56.2:6443" and "Bearer secret" in cfg.api_key.values()
    cfg.refresh_api_key_hook(cfg)  # the client calls it before every request
    assert cfg.host == "https://192.168.56.2:6443"


# -- Warning Events for invalid objects -------------------------------------------------------


def sctp_service(name: str, rv: str = "7") -> dict[str, Any]:
    bad = service(name, rv=rv)
    bad["apiVersion"] = "v1"
    bad["metadata"]["uid"] = "u-1"
    bad["spec"]["ports"][0]["protocol"] = "SCTP"
    return bad


def test_event_body_is_an_events_v1_warning() -> None:
    from pyproxy.model.objects import InvalidObject
    from pyproxy.sources.kube_events import event_body

    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)
    body = event_body(sctp_service("x"), InvalidObject("Service", "default/x", "SCTP is not supported"), "node1", now)
    assert body is not None
    assert body["apiVersion"] == "events.k8s.io/v1" and body["type"] == "Warning"
    assert body["eventTime"] == "2026-01-02T03:04:05.678901Z"
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "x",
                                 "uid": "u-1", "resourceVersion": "7"}
    assert "SCTP" in body["note"] and body["metadata"]["namespace"] == "default"
    assert re.fullmatch(r"x\.[0-9a-f]+", body["metadata"]["name"])
    assert event_body({"metadata": {"name": "n"}}, InvalidObject("Node", "n", "r"), "node1", now) is None


def test_event_budget_dedupes_and_limits_the_rate() -> None:
    from pyproxy.sources.kube_events import EventBudget

    budget = EventBudget(per_minute=2, remember=3)
    assert budget.admit(("a",), 0.0) and not budget.admit(("a",), 1.0)
    assert budget.admit(("b",), 2.0)
    assert not budget.admit(("c",), 3.0)  # third in the same minute
    assert budget.admit(("d",), 61.0)  # the window moved on
    for i in range(5):
        budget.admit((f"x{i}",), 200.0 + i)
    assert len(budget._seen) == 3  # bounded memory


def test_an_invalid_object_gets_one_event_and_failures_to_post_are_swallowed() -> None:
    stop = Stop()
    transport = FakeTransport(stop, [a_list([sctp_service("bad"), service("good")], "5"),
                                     a_list([sctp_service("bad")], "6")], [gone(), gone()])
    source = KubeSource(ClusterStore(), lambda: None, transport, "node1")
    watcher = Watcher(source.handlers[0], transport, lambda h: None, stop)
    watcher.run()
    assert [(ns, e["regarding"]["name"]) for ns, e in transport.events] == [("default", "bad")]  # once, not per list

    def refuse(namespace: str, body: Mapping[str, Any]) -> None:
        raise StatusError(403, "forbidden")

    transport = FakeTransport(Stop(), [a_list([sctp_service("bad", rv="9")], "5")], [])
    transport.post_event = refuse  # type: ignore[method-assign]
    source = KubeSource(ClusterStore(), lambda: None, transport, "node1")
    Watcher(source.handlers[0], transport, lambda h: None, transport.stop).run()  # no exception escapes


@pytest.mark.parametrize("text", ["just a string", "clusters: [", "{}"])
def test_a_bad_kubeconfig_is_a_clear_startup_error(tmp_path: Path, text: str) -> None:
    from pyproxy.sources.kube_client import SourceError
    from pyproxy.sources.kube_http import open_transport

    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(SourceError, match=str(path)):
        open_transport(str(path), "")
    with pytest.raises(SourceError, match="no kubeconfig found"):
        open_transport(str(tmp_path / "missing"), "")


@pytest.mark.parametrize("lean", [True, False])
def test_a_silent_watch_ends_quietly_and_reads_raw_json(caplog: pytest.LogCaptureFixture, lean: bool) -> None:
    """Both transports against a loopback server that sends one event, then falls silent."""
    import socket

    line = json.dumps(event("ADDED", service("raw", rv="3"))).encode() + b"\n"
    with socket.create_server(("127.0.0.1", 0)) as server:
        release = threading.Event()
        requests: list[bytes] = []

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                requests.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + f"{len(line):x}\r\n".encode() + line + b"\r\n")
                release.wait(5)  # silent, until the test is done

        thread = threading.Thread(target=serve)
        thread.start()
        transport = _loopback_transport(f"http://127.0.0.1:{server.getsockname()[1]}", lean)
        try:
            timing = WatchTiming(connect_timeout=2, silence_timeout=0.3)
            with caplog.at_level(logging.INFO, logger="pyproxy.kube"):
                events = list(transport.watch(Kind("Service", label_selector="!a"), "1", timing, 60))
        finally:
            release.set()
            thread.join(5)
            transport.close()
    assert events == [event("ADDED", service("raw", rv="3"))]  # camelCase dicts, as sent
    assert "no watch event for 0.3s" in caplog.text
    request_line = requests[0].split(b"\r\n")[0].decode()
    assert request_line.startswith("GET /api/v1/services?") and "watch=true" in request_line
    assert "resourceVersion=1" in request_line and "labelSelector=%21a" in request_line


def _loopback_transport(url: str, lean: bool) -> Any:
    if lean:
        from pyproxy.sources.kube_config import Connection
        from pyproxy.sources.kube_http import HttpTransport

        return HttpTransport(Connection(url))
    from kubernetes import client

    from pyproxy.sources.kube_client import ClientTransport

    cfg = client.Configuration()
    cfg.host = url
    return ClientTransport(client.ApiClient(cfg))


def test_the_restart_event_is_a_warning_about_the_node_in_default() -> None:
    from pyproxy.sources.kube_events import restart_event

    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)
    body = restart_event("node1", 4, True, now)
    assert body["metadata"]["namespace"] == "default" and body["metadata"]["name"].startswith("node1.pyproxy.")
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": "node1"}
    assert body["type"] == "Warning" and body["reason"] == "ProxyCrashLoop" and "4 restart(s)" in body["note"]
    assert body["eventTime"] == "2026-01-02T03:04:05.678901Z"
    assert restart_event("node1", 1, False, now)["reason"] == "ProxyRestarted"
