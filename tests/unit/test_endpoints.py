"""Endpoint selection (SPEC.md §2): merging slices, then kube-proxy's CategorizeEndpoints."""

from __future__ import annotations

from typing import Any

import pytest

from pyproxy.model.endpoints import Endpoint, categorize, merge_slices
from pyproxy.model.objects import EndpointSlice, ServiceKey, ServicePortName, SliceEndpoint, SlicePort

WEB = ServiceKey("shop", "web")
HTTP = ServicePortName(WEB, "http", "TCP")
NODE = "node1"


def sep(ip: str, node: str | None = NODE, *, ready: bool = True, serving: bool = True,
        terminating: bool = False, zones: frozenset[str] | None = None) -> SliceEndpoint:
    return SliceEndpoint(ip, ready, serving, terminating, node, zones)


def make_slice(name: str, endpoints: list[SliceEndpoint], ports: list[SlicePort] | None = None,
               service: ServiceKey = WEB) -> EndpointSlice:
    return EndpointSlice("shop", name, service, tuple([SlicePort("http", "TCP", 8080)] if ports is None else ports),
                         tuple(endpoints), None)


def ep(ip: str, *, local: bool = True, ready: bool = True, serving: bool = True, terminating: bool = False,
       zones: frozenset[str] | None = None, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port, ready, serving, terminating, local, zones)


# --- merge_slices -------------------------------------------------------------------------


def test_several_slices_merge_into_one_sorted_set() -> None:
    slices = [make_slice("a", [sep("10.0.0.3"), sep("10.0.0.1", "node2")]), make_slice("b", [sep("10.0.0.2")])]
    merged = merge_slices(HTTP, slices, NODE)
    assert [str(e) for e in merged] == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    assert [e.is_local for e in merged] == [False, True, True]


@pytest.mark.parametrize("terminating_first", [True, False])
def test_duplicate_ip_port_collapses_preferring_non_terminating(terminating_first: bool) -> None:
    dying = make_slice("old", [sep("10.0.0.1", ready=False, terminating=True)])
    alive = make_slice("new", [sep("10.0.0.1")])
    slices = [dying, alive] if terminating_first else [alive, dying]
    (only,) = merge_slices(HTTP, slices, NODE)
    assert only.address == ("10.0.0.1", 8080)
    assert (only.ready, only.terminating) == (True, False)


def test_same_ip_on_different_ports_is_not_a_duplicate() -> None:
    slices = [make_slice("a", [sep("10.0.0.1")]), make_slice("b", [sep("10.0.0.1")], [SlicePort("http", "TCP", 9090)])]
    assert [e.address for e in merge_slices(HTTP, slices, NODE)] == [("10.0.0.1", 8080), ("10.0.0.1", 9090)]


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([SlicePort("http", "TCP", 8080)], 8080),
        ([SlicePort("metrics", "TCP", 9100), SlicePort("http", "TCP", 8081)], 8081),
        ([SlicePort("http", "UDP", 8080)], None),  # same name, other protocol
        ([SlicePort("", "TCP", 8080)], None),  # unnamed is not "http"
        ([], None),
    ],
)
def test_ports_are_matched_by_name_and_protocol(ports: list[SlicePort], expected: int | None) -> None:
    merged = merge_slices(HTTP, [make_slice("a", [sep("10.0.0.1")], ports)], NODE)
    assert [e.port for e in merged] == ([] if expected is None else [expected])


def test_unnamed_port_matches_unnamed_slice_port() -> None:
    name = ServicePortName(WEB, "", "UDP")
    slices = [make_slice("a", [sep("10.0.0.1")], [SlicePort("", "UDP", 53), SlicePort("", "TCP", 54)])]
    assert [e.port for e in merge_slices(name, slices, NODE)] == [53]


def test_local_means_node_name_matches() -> None:
    slices = [make_slice("a", [sep("10.0.0.1", "node1"), sep("10.0.0.2", "node2"), sep("10.0.0.3", None)])]
    assert [e.is_local for e in merge_slices(HTTP, slices, "node1")] == [True, False, False]


def test_slices_of_no_endpoints_merge_to_nothing() -> None:
    assert merge_slices(HTTP, [make_slice("a", [])], NODE) == ()


# --- categorize ---------------------------------------------------------------------------

R: dict[str, Any] = dict(ready=True, serving=True, terminating=False)  # ready
ST: dict[str, Any] = dict(ready=False, serving=True, terminating=True)  # serving and terminating
T: dict[str, Any] = dict(ready=False, serving=False, terminating=True)  # terminating, no longer serving
NR: dict[str, Any] = dict(ready=False, serving=True, terminating=False)  # not ready (e.g. failing readiness)


@pytest.mark.parametrize(
    ("endpoints", "cluster", "local"),
    [
        # ready endpoints win; the rest are ignored
        ([("a", True, R), ("b", False, R), ("c", True, ST)], "ab", "a"),
        # no ready ones at all: fall back to serving+terminating ones
        ([("a", True, ST), ("b", False, ST), ("c", True, T), ("d", False, NR)], "ab", "a"),
        # terminating but not serving, or not ready and not terminating: never used
        ([("a", True, T), ("b", False, NR)], "", ""),
        # the local set falls back on its own: remote ready ones don't count for it
        ([("a", False, R), ("b", True, ST), ("c", True, T)], "a", "b"),
        # no local endpoints at all
        ([("a", False, R), ("b", False, ST)], "a", ""),
        ([], "", ""),
    ],
)
def test_categorize(endpoints: list[tuple[str, bool, dict[str, Any]]], cluster: str, local: str) -> None:
    eps = tuple(sorted(ep(f"10.0.0.{ord(n)}", local=is_local, **conds) for n, is_local, conds in endpoints))
    names = {f"10.0.0.{ord(n)}": n for n, _, _ in endpoints}
    sets = categorize(eps, zone=None)
    assert "".join(sorted(names[e.ip] for e in sets.cluster)) == cluster
    assert "".join(sorted(names[e.ip] for e in sets.local)) == local
    assert sets.all == eps


def test_local_ready_ips_counts_distinct_local_ready_ips_only() -> None:
    sets = categorize((
        ep("10.0.0.1", port=80), ep("10.0.0.1", port=81),  # one pod, two ports: one IP
        ep("10.0.0.2", **ST),  # terminating: not counted, so LBs drain the node
        ep("10.0.0.3", local=False),
        ep("10.0.0.4", **NR),
    ), zone=None)
    assert sets.local_ready_ips == frozenset({"10.0.0.1"})


def test_local_ready_ips_empty_while_only_terminating_pods_serve() -> None:
    sets = categorize((ep("10.0.0.2", **ST),), zone=None)
    assert sets.local == (ep("10.0.0.2", **ST),)  # traffic still goes there...
    assert sets.local_ready_ips == frozenset()  # ...but the health check says 0


# --- topology hints -----------------------------------------------------------------------

ZA, ZB = frozenset({"a"}), frozenset({"b"})


@pytest.mark.parametrize(
    ("hints", "zone", "expected"),
    [
        ([ZA, ZB, ZA], "a", [0, 2]),  # every ready endpoint has hints: narrow to the zone
        ([ZA, ZB, frozenset({"a", "b"})], "b", [1, 2]),
        ([ZA, ZB, None], "a", [0, 1, 2]),  # one endpoint without hints: ignore hints
        ([ZA, ZB, ZB], "c", [0, 1, 2]),  # no endpoint for this zone: ignore hints
        ([ZA, ZB, ZA], None, [0, 1, 2]),  # node has no zone
    ],
)
def test_topology_hints(hints: list[frozenset[str] | None], zone: str | None, expected: list[int]) -> None:
    eps = tuple(ep(f"10.0.0.{i}", local=False, zones=z) for i, z in enumerate(hints))
    sets = categorize(eps, zone)
    assert [int(e.ip.rsplit(".", 1)[1]) for e in sets.cluster] == expected


def test_hints_only_judged_on_ready_endpoints() -> None:
    """A not-ready endpoint without hints does not switch hints off."""
    eps = (ep("10.0.0.0", local=False, zones=ZA), ep("10.0.0.1", local=False, zones=ZB),
           ep("10.0.0.2", local=False, zones=None, **NR))
    assert [e.ip for e in categorize(eps, "a").cluster] == ["10.0.0.0"]


def test_hints_do_not_narrow_the_local_set() -> None:
    eps = (ep("10.0.0.0", zones=ZA), ep("10.0.0.1", zones=ZB))
    assert [e.ip for e in categorize(eps, "a").local] == ["10.0.0.0", "10.0.0.1"]



def test_endpoints_are_compact_immutable_values() -> None:
    made = Endpoint("10.0.0.1", 80, True, False, True, False, frozenset({"zone-a"}), None)
    assert not hasattr(made, "__dict__")  # a cluster holds one per endpoint and port
    assert made == Endpoint("10.0.0.1", 80, True, False, True, False, frozenset({"zone-a"}), None)
    assert hash(made) == hash(Endpoint("10.0.0.1", 80, True, False, True, False, frozenset({"zone-a"}), None))
    with pytest.raises(AttributeError):
        made.port = 81  # type: ignore[misc]
    # ordered field by field, as the frozen dataclass it replaces was
    assert sorted([Endpoint("10.0.0.2", 80, True, True, False, False), made]) == [made, Endpoint("10.0.0.2", 80, True, True, False, False)]
    assert (made.address, str(made)) == (("10.0.0.1", 80), "10.0.0.1:80")


def test_one_family_ports_share_their_sets() -> None:
    from pyproxy.model.endpoints import NO_ENDPOINTS, categorize_families, combine
    from pyproxy.model.family import Family

    v4 = (ep("10.0.0.1"), ep("10.0.0.2", **NR))
    families = categorize_families(v4, None)
    assert families[Family.IPV6] is NO_ENDPOINTS and combine(v4, families) == categorize(v4, None)
    mixed = (ep("10.0.0.1"), ep("fd00::1"))
    families = categorize_families(mixed, None)
    assert [e.ip for e in families[Family.IPV4].all] == ["10.0.0.1"] and [e.ip for e in families[Family.IPV6].all] == ["fd00::1"]
    assert [e.ip for e in combine(mixed, families).cluster] == ["10.0.0.1", "fd00::1"]