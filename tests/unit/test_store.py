"""The cluster store and its change tracker (STYLE.md: change trackers coalesce)."""

from __future__ import annotations

from typing import Any

from pyproxy.model.objects import EndpointSlice, Node, Service, ServiceKey, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore


def service(name: str, port: int = 80, namespace: str = "ns") -> Service:
    parsed = parse_service({"kind": "Service", "metadata": {"name": name, "namespace": namespace},
                            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": port}]}})
    assert parsed is not None
    return parsed


def endpoint_slice(name: str, service_name: str, *ips: str) -> EndpointSlice:
    obj: dict[str, Any] = {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service_name}},
        "ports": [{"port": 8080}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }
    parsed = parse_endpoint_slice(obj)
    assert parsed is not None
    return parsed


A, B = ServiceKey("ns", "a"), ServiceKey("ns", "b")


def synced_store() -> ClusterStore:
    store = ClusterStore()
    store.replace_all([service("a"), service("b")], [endpoint_slice("a-1", "a", "10.0.0.1")])
    store.take_changes()
    return store


def test_take_changes_returns_changed_services_and_clears() -> None:
    store = ClusterStore()
    store.upsert_service(A, service("a"))
    store.upsert_slice(("ns", "b-1"), endpoint_slice("b-1", "b", "10.0.0.2"))
    assert store.has_changes
    assert store.take_changes() == {A, B}
    assert not store.has_changes
    assert store.take_changes() == set()


def test_no_op_updates_mark_nothing() -> None:
    store = synced_store()
    store.upsert_service(A, service("a"))  # equal value, new object
    store.upsert_slice(("ns", "a-1"), endpoint_slice("a-1", "a", "10.0.0.1"))
    store.upsert_service(ServiceKey("ns", "never-seen"), None)  # deleting what is not there
    store.upsert_slice(("ns", "never-seen"), None)
    store.replace_all([service("a"), service("b")], [endpoint_slice("a-1", "a", "10.0.0.1")])
    assert not store.has_changes
    assert store.take_changes() == set()


def test_real_updates_mark_their_service() -> None:
    store = synced_store()
    store.upsert_service(A, service("a", port=81))
    assert store.take_changes() == {A}
    store.upsert_slice(("ns", "a-1"), endpoint_slice("a-1", "a", "10.0.0.1", "10.0.0.9"))
    assert store.take_changes() == {A}
    store.upsert_service(B, None)
    assert store.take_changes() == {B}
    assert B not in store.services


def test_synced_only_after_both_kinds_are_listed() -> None:
    store = ClusterStore()
    assert not store.synced
    store.upsert_service(A, service("a"))
    store.upsert_slice(("ns", "a-1"), endpoint_slice("a-1", "a", "10.0.0.1"))
    assert not store.synced  # single events are not a complete list
    store.replace_services([service("a")])
    assert not store.synced
    store.replace_slices([])
    assert store.synced


def test_synced_with_slices_listed_first() -> None:
    store = ClusterStore()
    store.replace_slices([])
    assert not store.synced
    store.replace_services([])
    assert store.synced


def test_replace_all_removes_vanished_objects() -> None:
    store = synced_store()
    store.replace_all([service("b")], [endpoint_slice("b-1", "b", "10.0.0.2")])
    assert set(store.services) == {B}
    assert set(store.slices) == {("ns", "b-1")}
    assert list(store.slices_of(A)) == []
    assert [s.name for s in store.slices_of(B)] == ["b-1"]
    assert store.take_changes() == {A, B}


def test_slice_moved_between_services_marks_both() -> None:
    store = synced_store()
    store.upsert_slice(("ns", "a-1"), endpoint_slice("a-1", "b", "10.0.0.1"))
    assert store.take_changes() == {A, B}
    assert list(store.slices_of(A)) == []
    assert [s.service for s in store.slices_of(B)] == [B]


def test_several_slices_per_service() -> None:
    store = synced_store()
    store.upsert_slice(("ns", "a-2"), endpoint_slice("a-2", "a", "10.0.0.3"))
    assert sorted(s.name for s in store.slices_of(A)) == ["a-1", "a-2"]
    store.upsert_slice(("ns", "a-1"), None)
    assert [s.name for s in store.slices_of(A)] == ["a-2"]
    assert store.take_changes() == {A}


def test_slice_deleted_marks_its_service() -> None:
    store = synced_store()
    store.upsert_slice(("ns", "a-1"), None)
    assert store.take_changes() == {A}
    assert store.slices == {}


def test_node_zone_change_marks_every_service() -> None:
    store = synced_store()
    store.set_node(Node("node1", "z1", False, False))
    assert store.take_changes() == {A, B}
    store.set_node(Node("node1", "z2", False, False))
    assert store.take_changes() == {A, B}


def test_node_change_without_zone_change_marks_no_service_but_is_a_change() -> None:
    store = synced_store()
    store.set_node(Node("node1", "z1", False, False))
    store.take_changes()
    store.set_node(Node("node1", "z1", True, False))  # being deleted: health cares, services don't
    assert store.has_changes
    assert store.take_changes() == set()
    store.set_node(Node("node1", "z1", True, False))  # no-op
    assert not store.has_changes


def test_mark_all_changed() -> None:
    store = synced_store()
    store.mark_all_changed()
    assert store.take_changes() == {A, B}
