"""IPv6 and dual-stack on the real kernel (SPEC.md §11): the lab's namespaces are dual-stack.

The same cluster as the other kernel tests (pa on node1; pb and pc on node2), each
namespace with a ULA IPv6 address beside its IPv4 one: the client fd00:56::100, the nodes
fd00:56::101 and ::102, pods fd00:244:N::M, the IPv6 service CIDR fd00:96::/112 routed to
node1. Every Service here is dual-stack (clusterIPs of both families, one slice per
family) unless the test says otherwise; each test checks what differs by family: which
family's pods answer, which source address a pod sees, refusals, affinity by the IPv6
client, UDP, and the `[address]:port` form in what a person reads.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP, CLIENT_IP6, node_ip6
from tests.kernel.conftest import Cluster, held_connection

pytestmark = pytest.mark.privileged

V4, V6 = "10.96.0.80", "fd00:96::80"
ALL = ("pa", "pb", "pc")
EXTERNAL6 = "fd00:57::200"  # an externalIP outside every subnet, routed by the client to node1


def lines_of(lines: list[str], key: str) -> list[str]:
    return [re.search(rf"{key}=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def dual_stack(cluster: Cluster, name: str, v4: str, v6: str, ports: list[dict[str, Any]],
               slice_ports: list[dict[str, Any]], pods: tuple[str, ...] = ALL, pods6: tuple[str, ...] | None = None,
               **kwargs: Any) -> list[dict[str, Any]]:
    """A dual-stack Service and its two slices (IPv4 and IPv6)."""
    return [
        m.service(name, v4, ports, cluster_ips=[v4, v6] if v4 else [v6], **kwargs),
        m.endpoint_slice(name, cluster.backends(*pods), slice_ports, name=f"{name}-v4"),
        m.endpoint_slice(name, cluster.backends(*(pods if pods6 is None else pods6), ipv6=True), slice_ports,
                         name=f"{name}-v6", address_type="IPv6"),
    ]


@pytest.fixture(scope="module")
def ipv6_routes(cluster: Cluster) -> Cluster:
    cluster.lab.route_client(f"{EXTERNAL6}/128", "node1")
    return cluster


def test_dual_stack_service_is_served_on_both_families(ipv6_routes: Cluster) -> None:
    cluster = ipv6_routes
    cluster.apply(*dual_stack(cluster, "dual", V4, V6, [m.port(80, 80)], [m.slice_port(80)]))
    v4 = cluster.run("client", "who", f"{V4}:80", "--count", "12")
    v6 = cluster.run("client", "who", f"[{V6}]:80", "--count", "12")
    assert set(lines_of(v4, "pod")) <= set(ALL) and set(lines_of(v6, "pod")) <= set(ALL)
    assert len(set(lines_of(v6, "pod"))) > 1, v6  # balanced over the IPv6 endpoints too
    # Cluster policy: the pod sees the node's address of the connection's own family
    node1 = cluster.lab.exec("node1", "ip", "-6", "-o", "addr", "show", "scope", "global").stdout
    assert set(lines_of(v6, "client")) <= set(re.findall(r"inet6 (\S+)/", node1)), v6
    assert all(":" not in ip for ip in lines_of(v4, "client")), v4
    # the node itself and a pod reach the IPv6 ClusterIP (the output chain, and a routed pod veth)
    assert set(lines_of(cluster.run("node1", "who", f"[{V6}]:80", "--count", "3"), "pod")) <= set(ALL)
    if "c6" not in cluster.lab.pods:
        cluster.lab.add_pod("c6", "node1")
    from_pod = cluster.run("c6", "who", f"[{V6}]:80", "--count", "3")
    assert set(lines_of(from_pod, "pod")) <= set(ALL) and len(from_pod) == 3


def test_affinity_is_keyed_by_the_ipv6_client(cluster: Cluster) -> None:
    cluster.apply(*dual_stack(cluster, "sticky6", "10.96.0.81", "fd00:96::81", [m.port(80, 80)], [m.slice_port(80)],
                              affinity_timeout=60))
    pods = lines_of(cluster.run("client", "who", "[fd00:96::81]:80", "--count", "15"), "pod")
    assert len(set(pods)) == 1, pods
    # the same host's IPv4 address is another client, with a pin of its own to an IPv4 pod
    v4 = lines_of(cluster.run("client", "who", "10.96.0.81:80", "--count", "5"), "pod")
    assert len(set(v4)) == 1
    page = json.loads(cluster.lab.exec("node1", "curl", "-s", "127.0.0.1:10249/debug/affinity?service=sticky6").stdout)
    pins = {row["client"]: row["endpoint"] for row in page["items"]}
    assert pins[CLIENT_IP6] == f"[{cluster.lab.pods[pods[0]].ip6}]:80"
    assert pins[CLIENT_IP] == f"{cluster.lab.pods[v4[0]].ip}:80"


def test_nodeport_local_keeps_the_client_ipv6_and_cluster_shows_the_node(cluster: Cluster) -> None:
    cluster.apply(
        *dual_stack(cluster, "np-local", "10.96.0.82", "fd00:96::82", [m.port(80, 80, node_port=30086)],
                    [m.slice_port(80)], type="NodePort", external_policy="Local"),
        *dual_stack(cluster, "np-cluster", "10.96.0.83", "fd00:96::83", [m.port(80, 80, node_port=30087)],
                    [m.slice_port(80)], pods=("pb", "pc"), type="NodePort"),
        name="nodeports.yaml",
    )
    local = cluster.run("client", "who", f"[{node_ip6(1)}]:30086", "--count", "3")
    assert lines_of(local, "pod") == ["pa"] * 3  # node1's only local pod
    assert lines_of(local, "client") == [CLIENT_IP6] * 3  # TPROXY + IPV6_TRANSPARENT: no SNAT
    # node2's pods: Cluster policy from node1 shows node1's LAN address
    cluster_policy = cluster.run("client", "who", f"[{node_ip6(1)}]:30087", "--count", "3")
    assert set(lines_of(cluster_policy, "pod")) <= {"pb", "pc"}
    assert lines_of(cluster_policy, "client") == [node_ip6(1)] * 3
    # node2 has two local pods of np-local; NodePorts are not served on link-local addresses
    assert set(lines_of(cluster.run("client", "who", f"[{node_ip6(2)}]:30086", "--count", "4"), "pod")) <= {"pb", "pc"}
    assert "fe80" not in cluster.lab.exec("node1", "nft", "list", "set", "ip6", "pyproxy", "svc_capture").stdout


def test_external_ip_and_refusal_per_family(ipv6_routes: Cluster) -> None:
    cluster = ipv6_routes
    cluster.apply(
        # IPv4 endpoints only: the IPv6 ClusterIP refuses, the IPv4 one serves
        m.service("v4-only-eps", "10.96.0.84", [m.port(80, 80)], cluster_ips=["10.96.0.84", "fd00:96::84"]),
        m.endpoint_slice("v4-only-eps", cluster.backends("pa"), [m.slice_port(80)]),
        # single-stack IPv6 with an externalIP and a local-only pod
        m.service("v6-ext", "fd00:96::85", [m.port(80, 80, node_port=30088)], cluster_ips=["fd00:96::85"],
                  type="NodePort", external_ips=[EXTERNAL6], external_policy="Local"),
        m.endpoint_slice("v6-ext", cluster.backends("pa", ipv6=True), [m.slice_port(80)], address_type="IPv6"),
        name="refusal.yaml",
    )
    outcome, ms = cluster.run("client", "connect", "[fd00:96::84]:80")[0].split()
    assert outcome == "refused" and float(ms) < 100, (outcome, ms)
    assert cluster.run("client", "connect", "10.96.0.84:80")[0].startswith("ok")
    external = cluster.run("client", "who", f"[{EXTERNAL6}]:80", "--count", "2")
    assert lines_of(external, "pod") == ["pa"] * 2 and lines_of(external, "client") == [CLIENT_IP6] * 2
    assert cluster.run("client", "who", "[fd00:96::85]:80")[0].startswith("pod=pa")
    # the Service has no IPv4 address at all: not even its NodePort is in the IPv4 table
    assert " 30088 " not in cluster.lab.exec("node1", "nft", "list", "table", "ip", "pyproxy").stdout
    assert cluster.run("client", "who", f"[{node_ip6(1)}]:30088")[0].startswith("pod=pa")


def test_udp_request_response_over_ipv6(cluster: Cluster) -> None:
    cluster.apply(
        *dual_stack(cluster, "dns6", "10.96.0.86", "fd00:96::86", [m.port(53, 53, protocol="UDP")],
                    [m.slice_port(53, protocol="UDP")]),
        *dual_stack(cluster, "dns6-local", "10.96.0.87", "fd00:96::87",
                    [m.port(53, 53, protocol="UDP", node_port=30053)], [m.slice_port(53, protocol="UDP")],
                    type="NodePort", external_policy="Local"),
        m.service("dns6-none", "fd00:96::88", [m.port(53, 53, protocol="UDP")], cluster_ips=["fd00:96::88"]),
        name="udp.yaml",
    )
    replies = cluster.run("client", "udp", "[fd00:96::86]:53", "--size", "3000")
    assert replies[0].startswith("pod=") and replies[0].endswith("whole=True"), replies
    local = cluster.run("client", "udp", f"[{node_ip6(1)}]:30053")
    assert lines_of(local, "pod") == ["pa"] and lines_of(local, "client") == [CLIENT_IP6]
    assert cluster.run("client", "udp", "[fd00:96::88]:53") == ["refused"]
    flows = json.loads(cluster.lab.exec("node1", "curl", "-s", "127.0.0.1:10249/debug/connections?service=dns6").stdout)
    assert not flows["items"] or all(row["frontend"] == "[fd00:96::86]:53" for row in flows["items"])


def test_addresses_are_written_with_brackets_for_people(cluster: Cluster) -> None:
    cluster.apply(*dual_stack(cluster, "dual", V4, V6, [m.port(80, 80)], [m.slice_port(80)]))
    with held_connection(cluster, f"[{V6}]:80") as held:
        assert held.stdout is not None
        assert held.stdout.readline().startswith("pod=")
        page = json.loads(cluster.lab.exec("node1", "curl", "-s",
                                           "127.0.0.1:10249/debug/connections?service=dual").stdout)
        rows = [r for r in page["items"] if r["frontend"] == f"[{V6}]:80"]
        assert rows, page
        assert re.fullmatch(r"\[fd00:56::100\]:\d+", rows[0]["client"]), rows[0]
        assert re.fullmatch(r"\[fd00:244:\d::\d+\]:80", rows[0]["endpoint"]), rows[0]
        table = cluster.lab.exec("node1", sys.executable, "-m", "pyproxy", "inspect", "connections",
                                 "--service", "dual").stdout
        assert re.search(r" \[fd00:56::100\]:\d+ +\[fd00:244:\d::\d+\]:80 ", table), table
