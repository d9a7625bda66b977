"""examples/: every scenario's manifests load with the standalone loader, with no problem,
and serve what SCENARIOS.md says (`pyproxy --manifests examples/DIR` serves them as they are)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable
from pyproxy.sources.manifests import load_manifests

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DIRS = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())

# per example: service port (namespace/name:port/protocol) -> (endpoint ports, affinity timeout, external Local)
EXPECTED: dict[str, dict[str, tuple[set[int], int | None, bool]]] = {
    "s1-affinity": {"default/sample-session-affinity:8080/TCP": ({80}, 10, False)},
    "s3-hundred-requests": {"default/whoami:80/TCP": ({80}, 10800, False)},
    "s5-local-nodeport": {"default/s5:80/TCP": ({80}, None, True)},
    "s6-named-port": {"default/named-port:80/TCP": ({8080}, None, False)},
    "s7-multi-port": {"default/multi:80/TCP": ({8080}, None, False), "default/multi:443/TCP": ({8443}, None, False)},
    "s8-clusterip-dns": {"default/web:80/TCP": ({80}, None, False), "kube-system/kube-dns:53/UDP": ({53}, None, False),
                         "kube-system/kube-dns:53/TCP": ({53}, None, False)},
}


def test_every_example_is_checked() -> None:
    assert [d.name for d in DIRS] == sorted(EXPECTED)


@pytest.mark.parametrize("directory", DIRS, ids=lambda d: d.name)
def test_an_example_loads_without_problems_and_serves_its_scenario(directory: Path) -> None:
    snapshot = load_manifests(directory, "node1")
    assert snapshot.problems == []
    store = ClusterStore()
    store.replace_all(snapshot.services, snapshot.slices)
    table = ServiceTable("node1")
    table.update(store.take_changes(), store, ("192.168.56.101",))
    served: dict[str, tuple[set[int], int | None, bool]] = {}
    for service in snapshot.services:
        for port in service.ports:
            state = table.ports[port.name]
            assert state.endpoints.cluster, f"{port.name} has no usable endpoint"
            key = f"{service.key.namespace}/{service.key.name}:{port.port}/{port.name.protocol}"
            served[key] = ({e.port for e in state.endpoints.cluster}, state.affinity_timeout, state.external_local)
    assert served == EXPECTED[directory.name]


def test_examples_can_be_served_together() -> None:
    """No two examples claim the same address, so they may be copied into one directory."""
    frontends: dict[tuple[str, str, int], str] = {}
    for directory in DIRS:
        for service in load_manifests(directory, "node1").services:
            for ip in service.cluster_ips:
                for port in service.ports:
                    key = (ip, port.name.protocol, port.port)
                    assert key not in frontends, f"{directory.name} and {frontends[key]} both claim {key}"
                    frontends[key] = directory.name
