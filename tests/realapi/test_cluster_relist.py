# mypy: disable-error-code="union-attr,arg-type,index"
"""A watch that expires: etcd compacted past pyproxy's resourceVersion -> 410 -> re-list.

The control plane runs without the watch cache, so every watch is served by etcd and a
resourceVersion older than the compaction is answered with 410 Gone at once.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.realapi.cluster import ALL, NODES, KubeCluster, pods_of, port, service_body, unique
from tests.realapi.kube import KubeOptions

pytestmark = [pytest.mark.realapi, pytest.mark.privileged]

KUBE_OPTIONS = KubeOptions(watch_cache=False)
HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]


def test_expired_watch_relists_and_applies_later_changes(cluster: KubeCluster) -> None:
    name = unique("relist")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "40"))) == set(ALL)
    listed = {n: cluster.log(n).count("Service: listed") for n in NODES}
    # Writes pyproxy does not watch move etcd past its resourceVersions; compact them away,
    # then break the open watches: they can only resume from a version that is gone.
    for i in range(5):
        cluster.core.create_namespaced_config_map("default", client.V1ConfigMap.from_dict(
            {"metadata": {"name": unique(f"filler-{i}")}, "data": {"i": str(i)}}))
    cluster.kube.compact_etcd()
    cluster.kube.restart_apiserver()
    for node in NODES:
        cluster.wait_for_log(node, "410 Gone", 0)
        cluster.wait_for_log(node, "Service: listed", listed[node])
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "40"))) == set(ALL), \
        "the re-list keeps what did not change"
    cluster.change(lambda: cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pb",), HTTP)))
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "10"))) == {"pb"}, \
        "changes after the re-list are applied"
