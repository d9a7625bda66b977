"""Standalone mode's manifest directory: loading, problems, and the polling watcher."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pyproxy.model.objects import ServiceKey
from pyproxy.sources.manifests import (
    ManifestError,
    ManifestSnapshot,
    fingerprint,
    load_manifests,
    manifest_files,
    watch_manifests,
)


def svc(name: str, ip: str = "10.96.0.10", namespace: str = "default", extra: str = "") -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: 80{extra}}}]
"""


def eps(name: str, service: str, *ips: str) -> str:
    endpoints = ", ".join(f"{{addresses: [{ip}], nodeName: node1}}" for ip in ips)
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{endpoints}]
"""


def write(directory: Path, name: str, *docs: str) -> Path:
    path = directory / name
    path.write_text("---\n".join(docs))
    return path


def names(snapshot: ManifestSnapshot) -> tuple[list[str], list[str]]:
    return sorted(s.key.name for s in snapshot.services), sorted(s.name for s in snapshot.slices)


# --- loading ------------------------------------------------------------------------------


def test_multi_document_files_and_several_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", svc("web"), eps("web-1", "web", "10.0.1.1"), "")  # an empty document too
    write(tmp_path, "b.yml", svc("db", "10.96.0.11"), eps("web-2", "web", "10.0.1.2"))
    snapshot = load_manifests(tmp_path, "node1")
    assert names(snapshot) == (["db", "web"], ["web-1", "web-2"])
    assert snapshot.problems == []
    assert snapshot.node is None


def test_only_yaml_files_and_no_hidden_ones(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "notes.txt", "this: [is not read")
    write(tmp_path, ".editor-swap.yaml", "also: [not read")
    write(tmp_path, "b.yaml.bak", svc("old"))
    assert [p.name for p in manifest_files(tmp_path)] == ["a.yaml"]
    assert names(load_manifests(tmp_path, "node1")) == (["web"], [])


def test_list_kind(tmp_path: Path) -> None:
    items = "\n".join("  - " + doc.replace("\n", "\n    ").rstrip() for doc in (svc("web"), eps("web-1", "web", "10.0.1.1")))
    write(tmp_path, "list.yaml", f"apiVersion: v1\nkind: List\nitems:\n{items}\n")
    assert names(load_manifests(tmp_path, "node1")) == (["web"], ["web-1"])


def test_invalid_documents_are_skipped_with_a_problem_and_the_rest_loads(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml",
          svc("good"),
          svc("bad", extra=", protocol: SCTP"),
          "- just\n- a list\n",
          eps("orphan", "", "10.0.1.1").replace("labels: {kubernetes.io/service-name: }", "labels: {}"),
          svc("bad-ip", ip="10.96.0.999"))
    snapshot = load_manifests(tmp_path, "node1")
    assert names(snapshot) == (["good"], [])
    assert len(snapshot.problems) == 4
    bad, not_mapping, orphan, bad_ip = snapshot.problems
    assert bad.startswith("a.yaml[1]: Service default/bad: ") and "protocol" in bad
    assert not_mapping.startswith("a.yaml[2]: ") and "not a mapping" in not_mapping
    assert orphan.startswith("a.yaml[3]: EndpointSlice default/orphan: ") and "service-name" in orphan
    assert bad_ip.startswith("a.yaml[4]: Service default/bad-ip: ") and "10.96.0.999" in bad_ip


def test_an_invalid_list_item_is_skipped_and_the_other_items_load(tmp_path: Path) -> None:
    write(tmp_path, "l.yaml", "kind: List\nitems:\n"
          "  - {kind: Service, metadata: {name: x}, spec: {clusterIP: 1.2.3.4}}\n"
          "  - {kind: Service, metadata: {name: y}, spec: {clusterIP: 1.2.3.5, ports: [{port: 80}]}}\n")
    snapshot = load_manifests(tmp_path, "node1")
    assert names(snapshot) == (["y"], [])
    (problem,) = snapshot.problems
    assert problem.startswith("l.yaml[0].items[0]: Service default/x: spec.ports")


@pytest.mark.parametrize(
    "document",
    [
        "kind: Service\nmetadata: just-a-string\n",
        "kind: Service\nmetadata: [a, b]\n",
        "kind: List\nitems: 5\n",
        "kind: List\nitems: {a: b}\n",
    ],
)
def test_malformed_documents_are_problems_not_crashes(tmp_path: Path, document: str) -> None:
    write(tmp_path, "a.yaml", document, svc("web"))
    snapshot = load_manifests(tmp_path, "node1")
    assert names(snapshot) == (["web"], [])
    (problem,) = snapshot.problems
    assert problem.startswith("a.yaml[0]")


def test_duplicates_across_files_are_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", svc("web"), eps("web-1", "web", "10.0.1.1"))
    write(tmp_path, "b.yaml", svc("web", "10.96.0.99"), eps("web-1", "web", "10.0.1.9"), svc("web", namespace="other"))
    snapshot = load_manifests(tmp_path, "node1")
    assert [(s.key, s.cluster_ips) for s in snapshot.services] == [
        (ServiceKey("default", "web"), ("10.96.0.10",)),  # the first definition wins
        (ServiceKey("other", "web"), ("10.96.0.10",)),  # same name, other namespace: not a duplicate
    ]
    assert [s.endpoints[0].ip for s in snapshot.slices] == ["10.0.1.1"]
    assert snapshot.problems == [
        "b.yaml[0]: Service default/web: already defined in a.yaml[0]",
        "b.yaml[1]: EndpointSlice default/web-1: already defined in a.yaml[1]",
    ]


def test_node_of_this_name_only(tmp_path: Path) -> None:
    write(tmp_path, "nodes.yaml",
          "kind: Node\nmetadata: {name: node2, labels: {topology.kubernetes.io/zone: z2}}\n",
          "kind: Node\nmetadata: {name: node1, labels: {topology.kubernetes.io/zone: z1}}\n")
    node = load_manifests(tmp_path, "node1").node
    assert node is not None and (node.name, node.zone) == ("node1", "z1")


def test_service_for_another_proxy_is_left_out(tmp_path: Path) -> None:
    labelled = svc("web").replace("metadata: {name: web, namespace: default}",
                                  "metadata: {name: web, labels: {service.kubernetes.io/service-proxy-name: px}}")
    write(tmp_path, "a.yaml", labelled)
    assert load_manifests(tmp_path, "node1").services == []
    assert [s.key.name for s in load_manifests(tmp_path, "node1", proxy_name="px").services] == ["web"]


def test_unparsable_file_fails_the_whole_load(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: {name: [unclosed\n")
    with pytest.raises(ManifestError, match=r"b\.yaml: not valid YAML"):
        load_manifests(tmp_path, "node1")


def test_unreadable_file_fails_the_whole_load(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"kind: Service\nname: \xff\xfe\n")  # not UTF-8
    with pytest.raises(ManifestError, match=r"a\.yaml: cannot be read"):
        load_manifests(tmp_path, "node1")


def test_a_directory_named_like_a_manifest_fails_the_load(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifests(tmp_path, "node1")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest directory"):
        load_manifests(tmp_path / "nope", "node1")


def test_fingerprint_changes_on_edit_add_and_remove(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", svc("web"))
    first = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == first
    path.write_text(svc("web", "10.96.0.20"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # even on a coarse-mtime filesystem
    second = fingerprint(tmp_path)
    assert second != first
    write(tmp_path, "b.yaml", svc("db"))
    third = fingerprint(tmp_path)
    assert third != second
    (tmp_path / "b.yaml").unlink()
    assert fingerprint(tmp_path) == second
    write(tmp_path, "ignored.txt", "x")
    assert fingerprint(tmp_path) == second


# --- watch_manifests ----------------------------------------------------------------------


def touch_later(path: Path, text: str) -> None:
    """Rewrite a file and make sure its mtime moves, whatever the filesystem's resolution."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))


async def next_delivery(queue: asyncio.Queue[ManifestSnapshot], limit: float = 2.0) -> ManifestSnapshot:
    return await asyncio.wait_for(queue.get(), limit)


async def test_watch_delivers_edits_and_keeps_the_last_good_state(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "a.yaml", svc("web"))
    queue: asyncio.Queue[ManifestSnapshot] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(watch_manifests(tmp_path, "node1", None, queue.put_nowait, 0.01, stop,
                                               fingerprint(tmp_path)), name="manifest-watch")
    try:
        await asyncio.sleep(0.05)
        assert queue.empty()  # nothing changed since the given fingerprint: nothing delivered

        touch_later(path, svc("web") + "---\n" + svc("db", "10.96.0.11"))
        assert names(await next_delivery(queue)) == (["db", "web"], [])

        touch_later(path, "kind: Service\nmetadata: {name: [broken\n")  # unparsable: refused whole
        await asyncio.sleep(0.1)
        assert queue.empty()
        refusals = [r for r in caplog.records if "reload refused" in r.getMessage()]
        assert len(refusals) == 1  # refused once per bad edit, not re-parsed on every poll
        assert "a.yaml" in refusals[0].getMessage()

        touch_later(path, svc("web", "10.96.0.30"))  # fixed: delivered again
        snapshot = await next_delivery(queue)
        assert [s.cluster_ips for s in snapshot.services] == [("10.96.0.30",)]

        write(tmp_path, "b.yaml", eps("web-1", "web", "10.0.1.1"))  # a new file
        assert names(await next_delivery(queue)) == (["web"], ["web-1"])
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 1.0)


async def test_watch_awaits_an_async_deliver_and_survives_a_vanished_directory(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    path = write(directory, "a.yaml", svc("web"))
    got: list[ManifestSnapshot] = []

    async def deliver(snapshot: ManifestSnapshot) -> None:
        await asyncio.sleep(0)
        got.append(snapshot)

    stop = asyncio.Event()
    task = asyncio.create_task(watch_manifests(directory, "node1", None, deliver, 0.01, stop, ()),
                               name="manifest-watch")
    try:
        deadline = time.monotonic() + 2
        while not got:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        path.unlink()
        directory.rmdir()
        await asyncio.sleep(0.05)
        assert not task.done()  # an unreadable directory is logged, not fatal
        assert len(got) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 1.0)
