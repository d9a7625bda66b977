"""Whose address an endpoint sees (SPEC.md §5), on the real kernel, TCP and UDP.

A pod reaching a Service keeps its own IP, to endpoints on its node and on the other, as
kube-proxy leaves in-cluster pod traffic alone (Kubernetes' e2e "should preserve source pod
IP for traffic thru service cluster IP"); the node itself, a pod reaching itself through its
Service (hairpin), and clients outside the cluster under `externalTrafficPolicy: Cluster`
get the node's address. A node knows its pods from its Node's `spec.podCIDRs` (and its pod
bridges): before the Node is read, every client gets the node's address.

On a pod bridge, an endpoint on the same bridge would answer the pod frame to frame, past
the proxy; pyproxy's `bridge pyproxy` table sends those replies up to the node instead
(dataplane/replies.py), so those endpoints see the pod's own address too, and a pod that
talks to such an endpoint's address and port directly, past the Service, still reaches it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import node_ip, pod_cidr, pod_cidr6
from tests.kernel.conftest import Cluster
from tests.kernel.test_scenarios import client_ips_of, pods_of

pytestmark = pytest.mark.privileged

SVC_IP = "10.96.3.10"  # pa (node1), pb and pc (node2), TCP 80 and UDP 5353 behind port 80
SELF_IP = "10.96.3.11"  # pa alone
SVC_IP6 = "fd00:96::3:12"  # pa, pb and pc over IPv6
NODES = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node{i}"},
          "spec": {"podCIDRs": [pod_cidr(i), pod_cidr6(i)]},
          "status": {"addresses": [{"type": "InternalIP", "address": node_ip(i)}]}} for i in (1, 2)]


def services(cluster: Cluster) -> list[dict[str, object]]:
    ports = [m.port(80, 80, name="t", node_port=30380), m.port(80, 5353, name="u", protocol="UDP")]
    slice_ports = [m.slice_port(80, name="t"), m.slice_port(5353, name="u", protocol="UDP")]
    return [
        m.service("src", SVC_IP, ports, type="NodePort"),
        m.endpoint_slice("src", cluster.backends("pa", "pb", "pc"), slice_ports),
        m.service("self", SELF_IP, [m.port(80, 80)]),
        m.endpoint_slice("self", cluster.backends("pa"), [m.slice_port(80)]),
        m.service("src6", SVC_IP6, [m.port(80, 80)], cluster_ips=[SVC_IP6]),
        m.endpoint_slice("src6", cluster.backends("pa", "pb", "pc", ipv6=True), [m.slice_port(80)],
                         address_type="IPv6"),
    ]


def addresses_of(cluster: Cluster, ns: str) -> set[str]:
    out = cluster.lab.exec(ns, "ip", "-o", "-4", "addr", "show").stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


@pytest.fixture(scope="module")
def routed(cluster: Cluster) -> Cluster:
    if "cl" not in cluster.lab.pods:
        cluster.lab.add_pod("cl", "node1")
        cluster.lab.start_echo("node1", tcp=(8088,))  # node1 itself as an endpoint (hostNetwork)
    cluster.apply(*services(cluster))
    return cluster


def test_before_the_node_is_known_a_pod_gets_the_node_address(routed: Cluster) -> None:
    """Standalone without a Node (or before its first read): no client counts as a pod."""
    cluster = routed  # the module's first test: no Node has been written yet
    seen = client_ips_of(cluster.run("cl", "who", f"{SVC_IP}:80", "--count", "6"))
    assert set(seen) <= addresses_of(cluster, "node1"), seen


def test_a_pod_keeps_its_address_to_endpoints_on_both_nodes_tcp_and_udp(routed: Cluster) -> None:
    cluster = routed
    cluster.apply(*NODES, name="node.yaml")
    pod_ip = cluster.lab.pods["cl"].ip
    lines = cluster.run("cl", "who", f"{SVC_IP}:80", "--count", "30")
    assert set(pods_of(lines)) == {"pa", "pb", "pc"}, lines  # node1's pod and node2's (a miss: 3*(2/3)^30)
    assert set(client_ips_of(lines)) == {pod_ip}, lines
    # UDP: every datagram a new flow (a new client port each run), so run several
    answers = [line for _ in range(8) for line in cluster.run("cl", "udp", f"{SVC_IP}:80", "--count", "2")]
    assert answers and all("whole=True" in line for line in answers), answers
    assert set(client_ips_of(answers)) == {pod_ip}, answers
    # IPv6: the pod's own IPv6 address (the Node's IPv6 podCIDR)
    lines6 = cluster.run("cl", "who", f"[{SVC_IP6}]:80", "--count", "30")
    assert set(pods_of(lines6)) == {"pa", "pb", "pc"}, lines6
    assert set(client_ips_of(lines6)) == {cluster.lab.pods["cl"].ip6}, lines6


def test_a_host_network_endpoint_on_the_pod_s_own_node_sees_the_node(routed: Cluster) -> None:
    """An endpoint that is node1 itself (hostNetwork, like the API server on a control-plane
    node) answers by the output path, straight to the pod: it sees the node's address, and
    the connection works (with the pod's own address it was reset: kind's CoreDNS never
    reached the API server). The same endpoint reached from node2's pods keeps their address."""
    cluster = routed
    cluster.apply(*NODES, name="node.yaml")
    cluster.apply(m.service("host", "10.96.3.13", [m.port(80, 8088)]),
                  m.endpoint_slice("host", [m.Backend(node_ip(1), "node1")], [m.slice_port(8088)]),
                  name="host.yaml")
    lines = cluster.run("cl", "who", "10.96.3.13:80", "--count", "4")
    assert pods_of(lines) == ["node1"] * 4, lines
    assert set(client_ips_of(lines)) <= addresses_of(cluster, "node1"), lines


def test_the_node_itself_a_hairpin_and_outside_clients_get_the_node_address(routed: Cluster) -> None:
    cluster = routed
    cluster.apply(*NODES, name="node.yaml")
    node1 = addresses_of(cluster, "node1")
    from_node = client_ips_of(cluster.run("node1", "who", f"{SVC_IP}:80", "--count", "6"))
    assert set(from_node) <= node1, from_node
    # pa through a Service whose only endpoint is pa: its own address would be answered inside pa
    hairpin = cluster.run("pa", "who", f"{SELF_IP}:80", "--count", "3")
    assert pods_of(hairpin) == ["pa"] * 3 and set(client_ips_of(hairpin)) <= node1, hairpin
    outside = cluster.run("client", "who", f"{node_ip(1)}:30380", "--count", "6")
    assert set(client_ips_of(outside)) <= node1, outside


PA_IP = "10.96.3.14"  # pa alone (node1's bridge): TCP 80, UDP 5353 behind port 80, and IPv6
PA_IP6 = "fd00:96::3:14"


@pytest.fixture(scope="module")
def same_bridge(bridged_cluster: Cluster) -> Cluster:
    """bcl and pa on node1's bridge cni0, pb and pc on node2's, the Nodes known."""
    cluster = bridged_cluster
    if "bcl" not in cluster.lab.pods:
        cluster.lab.add_pod("bcl", "node1")
    ports = [m.port(80, 80, name="t"), m.port(80, 5353, name="u", protocol="UDP")]
    slice_ports = [m.slice_port(80, name="t"), m.slice_port(5353, name="u", protocol="UDP")]
    cluster.apply(*services(cluster), *NODES,
                  m.service("pa", PA_IP, ports, cluster_ips=[PA_IP, PA_IP6]),
                  m.endpoint_slice("pa", cluster.backends("pa"), slice_ports),
                  m.endpoint_slice("pa", cluster.backends("pa", ipv6=True), slice_ports, name="pa6",
                                   address_type="IPv6"))
    return cluster


def test_on_a_pod_bridge_every_endpoint_sees_the_pod_s_own_address(same_bridge: Cluster) -> None:
    """pb and pc (node2) and pa, on bcl's own bridge, whose replies would pass the proxy by."""
    cluster = same_bridge
    pod_ip = cluster.lab.pods["bcl"].ip
    lines = cluster.run("bcl", "who", f"{SVC_IP}:80", "--count", "30")
    by_pod: dict[str, set[str]] = {}
    for pod, client in zip(pods_of(lines), client_ips_of(lines)):
        by_pod.setdefault(pod, set()).add(client)
    assert set(by_pod) == {"pa", "pb", "pc"}, lines
    assert by_pod == {"pa": {pod_ip}, "pb": {pod_ip}, "pc": {pod_ip}}, by_pod


@contextmanager
def br_netfilter(cluster: Cluster, on: bool) -> Iterator[None]:
    """node1's bridge with its frames through the IP hooks (kubeadm's setting) or not."""
    keys = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
    for key in keys:
        cluster.lab.sysctl("node1", key, "1" if on else "0")
    try:
        yield
    finally:
        for key in keys:
            cluster.lab.sysctl("node1", key, "1")


@pytest.mark.parametrize("netfilter", ["br_netfilter", "no_br_netfilter"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_same_bridge_endpoint_sees_the_pod_tcp_and_udp_of_any_size(same_bridge: Cluster, family: str,
                                                                      netfilter: str) -> None:
    """pa alone behind a ClusterIP: TCP, and UDP datagrams up to 64 KiB (a reply larger than
    the MTU comes back as fragments, which must all go up to the node alike: without
    br_netfilter, nothing reassembles them before the bridge decides where each goes)."""
    cluster = same_bridge
    pod = cluster.lab.pods["bcl"]
    address, own = (PA_IP, pod.ip) if family == "ipv4" else (f"[{PA_IP6}]", pod.ip6)
    with br_netfilter(cluster, netfilter == "br_netfilter"):
        lines = cluster.run("bcl", "who", f"{address}:80", "--count", "5")
        assert pods_of(lines) == ["pa"] * 5 and set(client_ips_of(lines)) == {own}, lines
        for size in (100, 2000, 65000):
            answers = cluster.run("bcl", "udp", f"{address}:80", "--size", str(size), "--count", "2",
                                  "--timeout", "3")
            assert len(answers) == 2 and all("whole=True" in line for line in answers), (size, answers)
            assert pods_of(answers) == ["pa"] * 2 and set(client_ips_of(answers)) == {own}, (size, answers)


def test_a_same_bridge_endpoint_sees_the_pod_under_strict_reverse_path_filtering(same_bridge: Cluster) -> None:
    """kind's nodes set rp_filter=1: the replies enter the node's IP layer on the bridge,
    where the endpoint's own route points, so the check passes."""
    cluster = same_bridge
    lab, own = cluster.lab, cluster.lab.pods["bcl"].ip
    before = lab.exec("node1", "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip()
    lab.sysctl("node1", "net.ipv4.conf.all.rp_filter", "1")
    try:
        lines = cluster.run("bcl", "who", f"{PA_IP}:80", "--count", "5")
        assert pods_of(lines) == ["pa"] * 5 and set(client_ips_of(lines)) == {own}, lines
        answers = cluster.run("bcl", "udp", f"{PA_IP}:80", "--size", "2000", "--count", "2", "--timeout", "3")
        assert len(answers) == 2 and all("whole=True" in line for line in answers), answers
        assert set(client_ips_of(answers)) == {own}, answers
    finally:
        lab.sysctl("node1", "net.ipv4.conf.all.rp_filter", before)


@pytest.mark.parametrize("netfilter", ["br_netfilter", "no_br_netfilter"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_pod_still_reaches_a_same_bridge_endpoint_directly(same_bridge: Cluster, family: str,
                                                             netfilter: str) -> None:
    """Past the Service, to pa's own address and endpoint ports: pa's replies match the
    steering set and go up to the node, which routes them back onto the bridge (no proxy
    socket waits for them). TCP, and UDP larger than the MTU."""
    cluster = same_bridge
    pa, bcl = cluster.lab.pods["pa"], cluster.lab.pods["bcl"]
    address, own = (pa.ip, bcl.ip) if family == "ipv4" else (f"[{pa.ip6}]", bcl.ip6)
    with br_netfilter(cluster, netfilter == "br_netfilter"):
        lines = cluster.run("bcl", "who", f"{address}:80", "--count", "5")
        assert pods_of(lines) == ["pa"] * 5 and set(client_ips_of(lines)) == {own}, lines
        answers = cluster.run("bcl", "udp", f"{address}:5353", "--size", "9000", "--count", "2", "--timeout", "3")
        assert len(answers) == 2 and all("whole=True" in line for line in answers), answers


FROM_PORT = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
sock.bind(("0.0.0.0", int(sys.argv[1])))
sock.sendto(b"x" * 100, (sys.argv[2], int(sys.argv[3])))
answer, sender = sock.recvfrom(1 << 16)
print(answer.split(b"\\n")[0].decode(), "from=%s:%d" % sender)
"""


def test_a_pod_s_udp_flow_upstream_keeps_its_port_so_its_direct_datagrams_get_their_answers(
        same_bridge: Cluster) -> None:
    """The upstream socket of a pod's UDP flow holds the pod's address *and port*, as DNAT
    leaves them (dataplane/udp.py): the pod's own kernel keeps that port for the socket
    that sent, so a datagram the pod sends straight to the endpoint from any other socket
    never shares the flow's addresses and is answered by pa itself. With a port of the
    node's choosing, one such answer in ~28,000 per open flow was taken by the flow (seen
    in CI here: the direct datagram timed out, its answer relayed to a long-closed port)."""
    cluster = same_bridge
    lab, pa, bcl = cluster.lab, cluster.lab.pods["pa"], cluster.lab.pods["bcl"]
    port = 47321
    via_service = lab.exec("bcl", sys.executable, "-c", FROM_PORT, str(port), PA_IP, "80").stdout.strip()
    assert via_service.startswith("pod=pa") and via_service.endswith(f"from={PA_IP}:80"), via_service
    sockets = lab.exec("node1", "ss", "-u", "-a", "-n", "-H").stdout
    upstream = [cols[-2] for cols in (line.split() for line in sockets.splitlines()) if cols[-1] == f"{pa.ip}:5353"]
    assert f"{bcl.ip}:{port}" in upstream, sockets
    for other in range(port + 1, port + 11):  # the pod's other ports, straight to pa: pa answers them
        direct = lab.exec("bcl", sys.executable, "-c", FROM_PORT, str(other), pa.ip, "5353").stdout.strip()
        assert direct.startswith("pod=pa") and direct.endswith(f"from={pa.ip}:5353"), direct


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_direct_same_bridge_traffic_passes_a_firewall_that_drops_invalid_forwards(same_bridge: Cluster,
                                                                                 family: str) -> None:
    """With br_netfilter on, the node's conntrack sees both directions of a direct
    connection in the bridge's netfilter pass, so the replies it routes back are no
    `INVALID` packets to a forward rule that drops them (a table of the test's own in node1,
    removed after). Without br_netfilter such a rule breaks it (docs/behaviour.md)."""
    cluster = same_bridge
    pa, bcl = cluster.lab.pods["pa"], cluster.lab.pods["bcl"]
    address, own = (pa.ip, bcl.ip) if family == "ipv4" else (f"[{pa.ip6}]", bcl.ip6)
    lab = cluster.lab
    lab.exec("node1", "nft", "add", "table", "inet", "labfw")
    try:
        lab.exec("node1", "nft", "add", "chain", "inet", "labfw", "forward",
                 "{ type filter hook forward priority 0; policy accept; }")
        lab.exec("node1", "nft", "add", "rule", "inet", "labfw", "forward", "ct", "state", "invalid", "counter", "drop")
        lab.exec("node1", "nft", "add", "rule", "inet", "labfw", "forward", "counter")
        lines = cluster.run("bcl", "who", f"{address}:80", "--count", "5")
        assert pods_of(lines) == ["pa"] * 5 and set(client_ips_of(lines)) == {own}, lines
        answers = cluster.run("bcl", "udp", f"{address}:5353", "--size", "9000", "--count", "2", "--timeout", "3")
        assert len(answers) == 2 and all("whole=True" in line for line in answers), answers
        # pa's replies really were routed back through the forward hook, and none was INVALID
        counters = [int(n) for n in re.findall(r"counter packets (\d+)",
                                                lab.exec("node1", "nft", "list", "table", "inet", "labfw").stdout)]
        assert counters[0] == 0 and counters[1] > 0, counters
    finally:
        lab.exec("node1", "nft", "delete", "table", "inet", "labfw")
