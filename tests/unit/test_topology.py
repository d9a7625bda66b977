"""Traffic distribution through hints: `categorize` against kube-proxy's own cases.

Each row is one of the cases of kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go)
that concerns hints, in pyproxy's terms: endpoints as (name, hints), the node's zone and
name, and the cluster set expected. PreferSameNode is GA (locked on) in the Kubernetes
release pyproxy follows, so its feature-gate-off rows are the gate-on ones here.
"""

from __future__ import annotations

import pytest

from pyproxy.model.endpoints import PREFER_SAME_NODE, PREFER_SAME_ZONE, Endpoint, categorize, topology_mode

NODE = "node-1"


def ep(name: int, zones: str = "", nodes: str = "", ready: bool = True, serving: bool | None = None,
       terminating: bool = False, local: bool = False) -> Endpoint:
    return Endpoint(f"10.1.2.{name}", 80, ready=ready, serving=ready if serving is None else serving,
                    terminating=terminating, is_local=local,
                    zone_hints=frozenset(zones.split(",")) if zones else None,
                    node_hints=frozenset(nodes.split(",")) if nodes else None)


def names(endpoints: tuple[Endpoint, ...]) -> list[int]:
    return sorted(int(e.ip.rsplit(".", 1)[1]) for e in endpoints)


SAME_NODE = [ep(3, "zone-a", "node-1"), ep(4, "zone-b", "node-2"), ep(5, "zone-c", "node-3"), ep(6, "zone-a", "node-4")]

CASES = [
    # (case, endpoints, zone, node, expected cluster set, expected mode)
    ("all hinted, zone label, endpoints for the zone",
     [ep(3, "zone-a"), ep(4, "zone-b"), ep(5, "zone-c"), ep(6, "zone-a")], "zone-a", NODE, [3, 6], PREFER_SAME_ZONE),
    ("node without a zone label", [ep(3, "zone-a")], None, NODE, [3], None),
    ("empty zone label", [ep(3, "zone-a")], "", NODE, [3], None),
    ("node in a zone no endpoint is hinted for", [ep(3, "zone-a")], "zone-b", NODE, [3], None),
    ("an unready endpoint in the zone is not used",
     [ep(3, "zone-a"), ep(4, "zone-b"), ep(5, "zone-c"), ep(6, "zone-a", ready=False)], "zone-a", NODE, [3],
     PREFER_SAME_ZONE),
    ("only unready endpoints in the zone: no filtering",
     [ep(3, "zone-a", ready=False), ep(4, "zone-b"), ep(5, "zone-c"), ep(6, "zone-a", ready=False)],
     "zone-a", NODE, [4, 5], None),
    ("one ready endpoint without hints: no filtering",
     [ep(3, "zone-a"), ep(4, "zone-b"), ep(5), ep(6, "zone-a")], "zone-a", NODE, [3, 4, 5, 6], None),
    ("several zones per endpoint",
     [ep(3, "zone-a,zone-b,zone-c"), ep(4, "zone-b,zone-c"), ep(5, "zone-b,zone-d"), ep(6, "zone-c")],
     "zone-c", NODE, [3, 4, 6], PREFER_SAME_ZONE),
    ("PreferSameNode: endpoints hinted for this node", SAME_NODE, "zone-a", NODE, [3], PREFER_SAME_NODE),
    ("PreferSameNode ignored when one endpoint has no hints",
     [ep(3, "zone-a", "node-1"), ep(4), ep(5, "zone-c", "node-3"), ep(6, "zone-a", "node-4")],
     "zone-a", NODE, [3, 4, 5, 6], None),
    ("PreferSameNode falls back to the zone when no endpoint is for this node",
     SAME_NODE, "zone-a", "node-0", [3, 6], PREFER_SAME_ZONE),
    ("node hints only, none for this node, no zone hints: no filtering",
     [ep(3, nodes="node-2"), ep(4, nodes="node-3")], "zone-a", NODE, [3, 4], None),
    ("every ready endpoint unready: the terminating fallback ignores hints",
     [ep(3, "zone-b", ready=False, serving=True, terminating=True),
      ep(4, "zone-a", ready=False, serving=True, terminating=True)], "zone-a", NODE, [3, 4], None),
    ("not ready, not serving, not terminating", [ep(0, ready=False, serving=False)], "zone-a", NODE, [], None),
    ("no endpoints", [], "zone-a", NODE, [], None),
]


@pytest.mark.parametrize(("endpoints", "zone", "node", "cluster", "mode"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cluster_set_follows_kube_proxys_hint_rules(
    endpoints: list[Endpoint], zone: str | None, node: str, cluster: list[int], mode: str | None
) -> None:
    eps = tuple(sorted(endpoints))
    assert topology_mode(eps, node, zone) == mode
    assert names(categorize(eps, zone, node).cluster) == cluster


def test_local_set_ignores_hints() -> None:
    """kube-proxy's "externalTrafficPolicy: Local, topology ignored for Local endpoints"."""
    eps = tuple(sorted([ep(3, "zone-a", local=True), ep(4, "zone-b", local=True), ep(5, "zone-c"), ep(6, "zone-a")]))
    sets = categorize(eps, "zone-a", NODE)
    assert names(sets.cluster) == [3, 6]
    assert names(sets.local) == [3, 4]


def test_conflicting_topology_and_localness() -> None:
    """kube-proxy's "conflicting topology and localness require merging allEndpoints"."""
    eps = tuple(sorted([ep(0, "zone-a", local=True), ep(1, "zone-b", local=True), ep(2, "zone-a"), ep(7, "zone-b")]))
    sets = categorize(eps, "zone-a", NODE)
    assert names(sets.cluster) == [0, 2] and names(sets.local) == [0, 1]


def test_local_set_falls_back_to_terminating_on_its_own() -> None:
    """kube-proxy's "iTP: Cluster, eTP: Local, with terminating endpoints"."""
    eps = tuple(sorted([ep(0), ep(1, ready=False, serving=False, local=True),
                        ep(2, ready=False, serving=True, terminating=True, local=True),
                        ep(3, ready=False, serving=True, terminating=True)]))
    sets = categorize(eps, None, NODE)
    assert names(sets.cluster) == [0] and names(sets.local) == [2]
