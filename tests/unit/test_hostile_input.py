"""Hostile input, one test per class of fault (issue 11), on the pure parsers and the loader.

Each test asserts what a user sees: the rejection names the file or object, the field and
the reason; the rest keeps being served; nothing but `InvalidObject` (or, for a whole
file, `ManifestError`) comes out.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyproxy.config import ManifestLimits
from pyproxy.model.fields import InvalidObject, describe
from pyproxy.model.objects import parse_endpoint_slice, parse_node, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable
from pyproxy.sources.manifests import ManifestError, ManifestSnapshot, fingerprint, load_manifests, watch_manifests
from tests.unit.test_objects import rejections

SERVICE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "externalIPs": ["192.0.2.7"], "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster", "healthCheckNodePort": 31000,
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}},
}
SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"},
                 "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [{"addresses": ["10.0.1.5"], "nodeName": "node1",
                   "conditions": {"ready": True, "serving": True, "terminating": False},
                   "hints": {"forZones": [{"name": "z1"}]}}],
}
NODE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Node",
    "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}},
    "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
}

# values of every type YAML or JSON can give a field, sizes and shapes included
WEIRD: list[Any] = [
    None, True, 0, -1, 10**40, 1.5, float("nan"), "", "x" * 5000, "None", [], ["a"], [[[]]], {}, {"a": 1},
    {1: 2}, set(), b"bytes", __import__("datetime").date(2026, 1, 1), list(range(20000)),
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a document (mapping keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths(child, (*prefix, i))


def replaced(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    result = copy.deepcopy(doc)
    target = result
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return result


PARSERS: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("Service", parse_service, SERVICE), ("EndpointSlice", parse_endpoint_slice, SLICE), ("Node", parse_node, NODE),
]


@pytest.mark.parametrize(("kind", "parse", "doc"), PARSERS, ids=[p[0] for p in PARSERS])
def test_wrong_types_in_every_field_are_rejections_naming_the_field(
    kind: str, parse: Callable[..., Any], doc: dict[str, Any]
) -> None:
    """Every field family (metadata, labels, spec scalars, lists, ports, endpoints,
    conditions, hints, status, taints) gets every kind of wrong value: the only outcome is
    a result or an InvalidObject that names the object kind and a reason."""
    assert rejections(parse, doc) == []  # the base document is good
    for path in paths(doc):
        for value in WEIRD:
            for err in rejections(parse, replaced(doc, path, value)):
                assert err.kind == kind and err.reason, err
                assert len(str(err)) < 600, f"reasons quote values briefly: {str(err)[:200]}"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "ports", 0, "port"), "80", "spec.ports[0].port: '80' is not a port number"),
        (("spec", "ports", 0, "protocol"), ["TCP"], "spec.ports[0].protocol: expected a string, got a list of 1 items"),
        (("spec", "clusterIPs", 0), {"ip": 1}, "spec.clusterIPs[0]: expected a string, got a mapping of 1 entries"),
        (("spec", "sessionAffinity"), 7, "spec.sessionAffinity: expected a string, got 7"),
        (("metadata", "name"), ["web"], "metadata.name: expected a string"),
        (("spec", "type"), "x" * 100, "spec.type: 'xxxxxxxx"),
    ],
)
def test_a_wrong_type_names_the_object_the_field_and_the_reason(path: tuple[Any, ...], value: Any, expected: str) -> None:
    found = rejections(parse_service, replaced(SERVICE, path, value))
    assert any(expected in str(err) for err in found), [str(e) for e in found]


def test_mixed_tcp_and_sctp_service_serves_its_tcp_port() -> None:
    obj = replaced(SERVICE, ("spec", "ports"), [
        {"name": "web", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30868},
    ])
    found: list[InvalidObject] = []
    service = parse_service(obj, report=found.append)
    assert service is not None and [p.name.port_name for p in service.ports] == ["web"]
    assert [str(e) for e in found] == [
        "Service shop/web: spec.ports[1].protocol: protocol SCTP is not supported by pyproxy (TCP, UDP) (port skipped)"]


def test_mixed_tcp_and_sctp_slice_keeps_its_tcp_port() -> None:
    obj = replaced(SLICE, ("ports",), [{"name": "web", "port": 8080, "protocol": "TCP"},
                                       {"name": "sig", "port": 3868, "protocol": "SCTP"}])
    found: list[InvalidObject] = []
    endpoint_slice = parse_endpoint_slice(obj, report=found.append)
    assert endpoint_slice is not None and [p.name for p in endpoint_slice.ports] == ["web"]
    assert len(endpoint_slice.endpoints) == 1
    assert "ports[1].protocol" in str(found[0]) and "(port skipped)" in str(found[0])


def test_a_bad_endpoint_skips_that_endpoint_not_the_slice() -> None:
    obj = replaced(SLICE, ("endpoints",), [
        {"addresses": ["10.0.1.5"]}, {"addresses": ["10.0.1.6"], "conditions": {"ready": "yes"}},
        {"addresses": ["10.0.1.7"], "nodeName": ["node1"]}, {"addresses": ["10.0.1.8"]},
    ])
    found: list[InvalidObject] = []
    endpoint_slice = parse_endpoint_slice(obj, report=found.append)
    assert endpoint_slice is not None
    assert [e.ip for e in endpoint_slice.endpoints] == ["10.0.1.5", "10.0.1.8"]
    assert ["endpoints[1].conditions.ready" in str(found[0]), "endpoints[2].nodeName" in str(found[1])] == [True, True]


def test_only_a_service_wide_field_rejects_the_whole_service() -> None:
    with pytest.raises(InvalidObject, match=r"Service shop/web: spec.externalTrafficPolicy: 'Nearby' is not one of"):
        parse_service(replaced(SERVICE, ("spec", "externalTrafficPolicy"), "Nearby"))
    with pytest.raises(InvalidObject, match=r"spec.ports: no port can be served \(spec.ports\[0\].port"):
        parse_service(replaced(SERVICE, ("spec", "ports"), [{"port": 0}]))


@pytest.mark.parametrize("zone", [["a", "b"], {"z": 1}, 5, True, "x" * 300])
def test_a_bad_zone_label_is_ignored_with_a_rejection_and_syncs_go_on(zone: Any) -> None:
    found: list[InvalidObject] = []
    node = parse_node(replaced(NODE, ("metadata", "labels", "topology.kubernetes.io/zone"), zone), report=found.append)
    assert node.zone is None and node.autoscaler_tainted
    assert len(found) == 1
    assert str(found[0]).startswith("Node node1: metadata.labels['topology.kubernetes.io/zone']: ")
    assert str(found[0]).endswith("(zone label skipped)")
    # the table built with that node (and slices carrying hints) is computed, not a crash
    store = ClusterStore()
    service, endpoint_slice = parse_service(SERVICE), parse_endpoint_slice(SLICE)
    assert service is not None and endpoint_slice is not None
    store.replace_all([service], [endpoint_slice])
    store.set_node(node)
    table = ServiceTable("node1", capacity=16, rng=random.Random(1))
    added, _ = table.update(store.take_changes(), store, ["192.168.56.101"])
    assert added


def test_describe_never_dumps_or_raises() -> None:
    bomb: list[Any] = ["x"]
    for _ in range(30):
        bomb = [bomb] * 10  # 10^30 leaves by reference
    assert describe(bomb) == "a list of 10 items"
    assert describe(10**5000) == "a very large integer"  # repr() would raise (int max str digits)
    assert describe("y" * 10**6).endswith("(1000000 characters)")


# --- the manifest loader ---------------------------------------------------------------------

GOOD = """\
apiVersion: v1
kind: Service
metadata: {name: good}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("style", ["flow", "block", "huge"])
def test_deep_yaml_is_refused_naming_the_file_and_the_limit(tmp_path: Path, style: str) -> None:
    if style == "block":
        text = "".join(f"{'  ' * i}k{i}:\n" for i in range(300)) + "  " * 300 + "leaf: 1\n"
    else:
        depth = 500 if style == "flow" else 100000
        text = "a: " + "[" * depth + "]" * depth + "\n"
    write(tmp_path, "deep.yaml", text)
    reason = r"nested deeper than 64 levels \(maxDepth\)" if style != "huge" else "nesting depth"
    with pytest.raises(ManifestError, match=rf"deep\.yaml: .*{reason}"):
        load_manifests(tmp_path, "node1")


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "kind: Service\nmetadata: {name: bomb}\n" + "\n".join(lines) + f"\nspec: {{ports: *a{levels}}}\n"


def test_alias_bomb_is_refused_fast_before_anything_is_built(tmp_path: Path) -> None:
    write(tmp_path, "bomb.yaml", alias_bomb())
    started = time.monotonic()
    with pytest.raises(ManifestError, match=r"bomb\.yaml: aliases expand to more than 100000 nodes \(maxAliasExpansion\)"):
        load_manifests(tmp_path, "node1")
    assert time.monotonic() - started < 2


def test_limits_are_configurable(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD + "---\n" + GOOD.replace("good", "good2").replace(".20", ".21"))
    assert len(load_manifests(tmp_path, "node1").services) == 2
    with pytest.raises(ManifestError, match=r"more than 1 documents \(maxDocuments\)"):
        load_manifests(tmp_path, "node1", limits=ManifestLimits(maxDocuments=1))
    with pytest.raises(ManifestError, match=r"larger than 100 bytes \(manifestLimits.maxFileSize\)"):
        load_manifests(tmp_path, "node1", limits=ManifestLimits(maxFileSize=100))
    with pytest.raises(ManifestError, match=r"nested deeper than 2 levels"):
        load_manifests(tmp_path, "node1", limits=ManifestLimits(maxDepth=2))


def test_a_small_alias_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "kind: Service\nmetadata: {name: web, labels: &l {app: web}}\n"
                              "spec: {clusterIP: 10.96.0.30, ports: [{port: 80}], selector: *l}\n")
    assert [s.key.name for s in load_manifests(tmp_path, "node1").services] == ["web"]


@pytest.mark.parametrize("how", ["fifo", "symlink-to-fifo", "socket"])
def test_a_file_that_is_not_regular_is_skipped_with_a_problem_naming_it(tmp_path: Path, how: str) -> None:
    write(tmp_path, "good.yaml", GOOD)
    special = tmp_path / ("special.yaml" if how != "symlink-to-fifo" else "target")
    sock = None
    if how == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(special))
    else:
        os.mkfifo(special)
    if how == "symlink-to-fifo":
        (tmp_path / "link.yaml").symlink_to(special)
    try:
        started = time.monotonic()
        snapshot = load_manifests(tmp_path, "node1")
        assert time.monotonic() - started < 2, "a FIFO must never block the reader"
    finally:
        if sock is not None:
            sock.close()
    assert [s.key.name for s in snapshot.services] == ["good"]
    name = "link.yaml" if how == "symlink-to-fifo" else "special.yaml"
    kind = "a socket" if how == "socket" else "a FIFO"
    assert snapshot.problems == [f"{name}: not a regular file ({kind}); skipped"]


def test_manifest_parts_are_reported_with_file_document_and_field(tmp_path: Path) -> None:
    write(tmp_path, "mixed.yaml", GOOD.replace("[{port: 80}]", "[{name: a, port: 80}, {name: b, port: 81, protocol: SCTP}]"))
    snapshot = load_manifests(tmp_path, "node1")
    assert [p.port for s in snapshot.services for p in s.ports] == [80]
    assert snapshot.parts == ["mixed.yaml[0]: Service default/good: spec.ports[1].protocol: protocol SCTP is not "
                              "supported by pyproxy (TCP, UDP) (port skipped)"]


async def watch(tmp_path: Path, snapshots: list[ManifestSnapshot], stop: asyncio.Event) -> asyncio.Task[None]:
    return asyncio.create_task(watch_manifests(tmp_path, "node1", None, snapshots.append, 0.02, stop,
                                               fingerprint(tmp_path)))


async def wait_for(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("bad", ["deep", "bomb", "fifo"])
async def test_the_watcher_survives_bad_files_and_applies_later_good_changes(
    tmp_path: Path, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "a.yaml", GOOD)
    snapshots: list[ManifestSnapshot] = []
    stop = asyncio.Event()
    task = await watch(tmp_path, snapshots, stop)
    try:
        ticks: list[float] = []

        async def ticker() -> None:  # the data plane's stand-in: it must never wait on a file
            for _ in range(200):
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        if bad == "fifo":
            os.mkfifo(tmp_path / "pipe.yaml")
        else:
            write(tmp_path, "bad.yaml", alias_bomb() if bad == "bomb" else "a: " + "[" * 50000 + "]" * 50000)
        if bad == "fifo":
            await wait_for(lambda: any("pipe.yaml: not a regular file (a FIFO); skipped" in p
                                       for s in snapshots for p in s.problems))
        else:
            await wait_for(lambda: "manifest reload refused" in caplog.text and "bad.yaml" in caplog.text)
            (tmp_path / "bad.yaml").unlink()  # the user fixes it: a refused reload is not a dead watcher
        write(tmp_path, "b.yaml", GOOD.replace("good", "later").replace(".20", ".22"))
        await wait_for(lambda: any("later" in [s.key.name for s in snap.services] for snap in snapshots))
        await ticking
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f}s while a file was read"
    finally:
        stop.set()
        await task


# --- objects from the API server get the same hardening -----------------------------------


def test_hostile_objects_from_the_api_server_are_skipped_and_the_watch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    from pyproxy.sources.kube import KubeSource, Watcher
    from tests.unit.test_kube_source import FakeTransport, Stop, a_list, service

    mixed = service("mixed", ip="10.96.0.11")
    mixed["spec"]["ports"].append({"name": "sig", "port": 3868, "protocol": "SCTP"})
    hostile = [{"kind": "Service", "metadata": ["not", "a", "mapping"]},
               {"kind": "Service", "metadata": {"name": {"deep": [1, 2]}, "namespace": "default"}},
               replaced(service("typed", ip="10.96.0.12"), ("spec", "ports", 0, "port"), [80])]
    watch = [{"type": "MODIFIED", "object": o} for o in hostile] + [
        {"type": "ADDED", "object": service("later", ip="10.96.0.13", rv="9")}]
    stop = Stop()
    transport = FakeTransport(stop, [a_list([service("good"), mixed, *hostile], "5")], [watch])
    store = ClusterStore()
    source = KubeSource(store, lambda: None, transport, "node1")
    watcher = Watcher(source.handlers[0], transport, lambda h: None, stop)
    watcher.run()
    snapshot, changes = source.handlers[0].pending.take()
    assert snapshot is not None
    served = {k[1] for k, v in snapshot.items() if v is not None} | {k[1] for k, v in changes.items() if v is not None}
    assert served == {"good", "mixed", "later"}
    assert "watch failed unexpectedly" not in caplog.text and not source.broken
    assert "Service default/mixed: spec.ports[1].protocol: protocol SCTP is not supported" in caplog.text
    assert "Service default/typed: spec.ports: no port can be served (spec.ports[0].port: a list of 1 items" in caplog.text
    reasons = [e["note"] for _, e in transport.events]
    assert any("mixed" in n or "SCTP" in n for n in reasons), reasons
