"""Pods on a Linux bridge with br_netfilter on (the `bridge` CNI plugin's shape), on the real kernel.

Shape: the kernel tier's cluster, but node1 and node2 hang their pods off a bridge `cni0`
holding the pods' gateway (10.244.N.1/24), the pods' veths enslaved to it, and
`net.bridge.bridge-nf-call-iptables=1` set in each node. Pods pa and the client pod `bcl`
sit on node1's bridge; pb and pc on node2's. The LAN client routes the service CIDR to
node1. Without pyproxy's re-entry chain (nft.py) every new connection from a bridged pod to
a service address times out; routed pods are covered by the other modules.
"""

from __future__ import annotations

import collections
import shutil

import pytest

from pyproxy.demo import dns
from pyproxy.demo import manifests as m
from pyproxy.demo.lab import BRIDGE, CLIENT_IP, node_ip
from tests.conftest import skip_or_fail
from tests.kernel.conftest import Cluster
from tests.kernel.test_scenarios import client_ips_of, pods_of

pytestmark = pytest.mark.privileged

SVC_IP = "10.96.1.10"
LOCAL_IP = "10.96.1.11"
STICKY_IP = "10.96.1.12"
EMPTY_IP = "10.96.1.13"
DNS_IP = "10.96.1.53"
ALL = ("pa", "pb", "pc")
RECORDS = {"web": "10.1.2.3", "db": "10.1.2.4"}


@pytest.fixture(scope="module")
def bridged(bridged_cluster: Cluster) -> Cluster:
    """The bridged cluster with a client pod on node1's bridge and the module's Services."""
    cluster = bridged_cluster
    if "bcl" not in cluster.lab.pods:
        cluster.lab.add_pod("bcl", "node1")
    cluster.apply(
        m.service("web", SVC_IP, [m.port(8080, 80, node_port=30180)], type="NodePort"),
        m.endpoint_slice("web", cluster.backends(*ALL), [m.slice_port(80)]),
        m.service("local", LOCAL_IP, [m.port(8080, 80, node_port=30181)], type="NodePort", external_policy="Local"),
        m.endpoint_slice("local", cluster.backends(*ALL), [m.slice_port(80)]),
        m.service("sticky", STICKY_IP, [m.port(8080, 80)], affinity_timeout=60),
        m.endpoint_slice("sticky", cluster.backends(*ALL), [m.slice_port(80)]),
        m.service("empty", EMPTY_IP, [m.port(8080, 80)]),
    )
    return cluster


def test_the_pods_really_hang_off_a_bridge_with_br_netfilter_on(bridged: Cluster) -> None:
    lab = bridged.lab
    for node in ("node1", "node2"):
        assert lab.exec(node, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables").stdout.strip() == "1"
    ports = lab.exec("node1", "ip", "-o", "link", "show", "master", BRIDGE).stdout
    assert "vpa@" in ports and "vbcl@" in ports


def test_clusterip_from_a_bridged_pod_reaches_pods_on_its_bridge_and_the_other_node(bridged: Cluster) -> None:
    lines = bridged.run("bcl", "http", f"{SVC_IP}:8080", "--count", "30", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines  # pa on the same bridge, pb and pc on node2


def test_nodeport_cluster_policy_from_the_lan_client(bridged: Cluster) -> None:
    lines = bridged.run("client", "http", f"{node_ip(1)}:30180", "--count", "30", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines
    # Cluster policy: the pods see a node's address, never the client's
    assert CLIENT_IP not in client_ips_of(lines)


def test_nodeport_local_policy_keeps_the_clients_ip_across_the_bridge(bridged: Cluster) -> None:
    lines = bridged.run("client", "http", f"{node_ip(1)}:30181", "--count", "10", "--timeout", "3")
    assert pods_of(lines) == ["pa"] * 10, lines  # only node1's own pod
    assert client_ips_of(lines) == [CLIENT_IP] * 10  # the transparent upstream's replies came back


def test_nodeport_from_a_bridged_pod_to_its_own_node(bridged: Cluster) -> None:
    lines = bridged.run("bcl", "http", f"{node_ip(1)}:30180", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines


def test_the_node_itself_reaches_the_cluster_ip(bridged: Cluster) -> None:
    lines = bridged.run("node1", "http", f"{SVC_IP}:8080", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines


def test_clientip_affinity_sticks_for_a_bridged_pod(bridged: Cluster) -> None:
    picks = collections.Counter(pods_of(bridged.run("bcl", "http", f"{STICKY_IP}:8080", "--count", "20",
                                                    "--timeout", "3")))
    assert len(picks) == 1 and sum(picks.values()) == 20, picks


def test_a_service_without_endpoints_is_refused_for_a_bridged_pod(bridged: Cluster) -> None:
    lines = bridged.run("bcl", "connect", f"{EMPTY_IP}:8080", "--timeout", "3")
    assert lines[0].split()[0] == "refused", lines


def test_cluster_dns_over_udp_through_the_cluster_ip_from_a_bridged_pod(bridged: Cluster) -> None:
    for tool, package in (("dnsmasq", "dnsmasq-base"), ("dig", "dnsutils")):
        if shutil.which(tool) is None:
            skip_or_fail(f"needs '{tool}' (apt-get install {package})")
    dns.setup_cluster_dns(bridged, pods={"bdns1": "node1", "bdns2": "node2"}, cluster_ip=DNS_IP, records=RECORDS)
    for name, address in RECORDS.items():
        assert dns.lookup(bridged.lab, "bcl", f"{DNS_IP}:53", name) == [address], name
    answered_by = {dns.lookup(bridged.lab, "bcl", f"{DNS_IP}:53", "whoami", "TXT")[0] for _ in range(20)}
    assert answered_by == {"bdns1", "bdns2"}  # the DNS pod on the same bridge and the one on node2
    assert dns.lookup(bridged.lab, "bcl", f"{DNS_IP}:53", "web", tcp=True) == ["10.1.2.3"]


def test_local_nodeport_from_a_bridged_pod_to_its_own_node_is_a_hairpin(bridged: Cluster) -> None:
    """Like kube-proxy's short-circuit, a pod on the bridge is served from the cluster set
    (pyproxy counts the pod bridge's subnet as local sources, whatever the detection mode
    finds); this module writes no Node, so no client counts as a pod and the endpoints see
    the node's address (test_pod_source.py has the pods' own addresses)."""
    lines = bridged.run("bcl", "http", f"{node_ip(1)}:30181", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines
    assert bridged.lab.pods["bcl"].ip not in client_ips_of(lines)


def test_a_bridge_that_appears_later_is_hooked_at_the_next_sync(bridged: Cluster) -> None:
    """As with a CNI plugin that makes its bridge for the node's first pod, after pyproxy
    started: `cbr0` (one of the default pod bridges) appears on node1 with a pod behind it."""
    lab = bridged.lab
    lab.exec("node1", "ip", "link", "add", "cbr0", "type", "bridge")
    lab.exec("node1", "ip", "addr", "add", "10.244.11.1/24", "dev", "cbr0")
    lab.exec("node1", "ip", "link", "set", "cbr0", "up")
    lab.add_ns("late")
    lab.veth("late", "eth0", "node1", "vlate")
    lab.exec("node1", "ip", "link", "set", "vlate", "master", "cbr0")
    lab.exec("late", "ip", "addr", "add", "10.244.11.2/24", "dev", "eth0")
    lab.exec("late", "ip", "route", "add", "default", "via", "10.244.11.1")
    # any change makes a sync; it finds the new bridge and rewrites the table with its hook
    bridged.apply(m.service("late", "10.96.1.20", [m.port(8080, 80)]),
                  m.endpoint_slice("late", bridged.backends(*ALL), [m.slice_port(80)]), name="late.yaml",
                  nodes=["node1"])
    assert "pod bridges: cbr0 10.244.11.0/24, cni0 10.244.1.0/24" in bridged.log("node1")
    lines = bridged.run("late", "http", f"{SVC_IP}:8080", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines


def test_bridged_pods_also_work_with_br_netfilter_off(bridged: Cluster) -> None:
    lab = bridged.lab
    lab.sysctl("node1", "net.bridge.bridge-nf-call-iptables", "0")
    try:
        lines = bridged.run("bcl", "http", f"{SVC_IP}:8080", "--count", "20", "--timeout", "3")
        assert set(pods_of(lines)) == set(ALL), lines
        assert udp_echo_answers(bridged)
    finally:
        lab.sysctl("node1", "net.bridge.bridge-nf-call-iptables", "1")


def udp_echo_answers(cluster: Cluster) -> bool:
    """One UDP datagram through a ClusterIP from the bridged pod comes back from an echo pod."""
    cluster.apply(m.service("udp-echo", "10.96.1.21", [m.port(5353, 5353, protocol="UDP")]),
                  m.endpoint_slice("udp-echo", cluster.backends(*ALL), [m.slice_port(5353, protocol="UDP")]),
                  name="udp-echo.yaml")
    lines = cluster.run("bcl", "udp", "10.96.1.21:5353", "--timeout", "3")
    return bool(lines) and "pod=" in lines[0]


def test_bridged_pods_work_with_strict_reverse_path_filtering(bridged: Cluster) -> None:
    """kind's nodes (and many distributions) set rp_filter=1; the re-entry must survive it."""
    lab = bridged.lab
    before = lab.exec("node1", "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout.strip()
    lab.sysctl("node1", "net.ipv4.conf.all.rp_filter", "1")
    try:
        lines = bridged.run("bcl", "http", f"{SVC_IP}:8080", "--count", "20", "--timeout", "3")
        assert set(pods_of(lines)) == set(ALL), lines
        lines = bridged.run("bcl", "http", f"{node_ip(1)}:30180", "--count", "10", "--timeout", "3")
        assert len(pods_of(lines)) == 10, lines
        assert udp_echo_answers(bridged)
    finally:
        lab.sysctl("node1", "net.ipv4.conf.all.rp_filter", before)


def test_ipv6_clusterip_from_a_bridged_pod(bridged: Cluster) -> None:
    """br_netfilter runs the IPv6 hooks from the bridge too (bridge-nf-call-ip6tables): the
    re-entry chain's IPv6 set sends those frames through pyproxy's veth as it does IPv4's."""
    lab = bridged.lab
    assert lab.exec("node1", "sysctl", "-n", "net.bridge.bridge-nf-call-ip6tables").stdout.strip() == "1"
    bridged.apply(
        m.service("web6", "10.96.1.16", [m.port(8080, 80)], cluster_ips=["10.96.1.16", "fd00:96::1:16"]),
        m.endpoint_slice("web6", bridged.backends(*ALL, ipv6=True), [m.slice_port(80)], address_type="IPv6"),
        name="ipv6.yaml",
    )
    lines = bridged.run("bcl", "http", "[fd00:96::1:16]:8080", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines


def test_local_ipv6_nodeport_from_a_bridged_pod_to_its_own_node_is_a_hairpin(bridged: Cluster) -> None:
    """As for IPv4: the pod bridge's IPv6 subnet counts as local sources, so a bridged pod is
    served from the cluster set with the node's address, never answered past the proxy."""
    bridged.apply(
        m.service("local6", "fd00:96::1:17", [m.port(8080, 80, node_port=30182)], cluster_ips=["fd00:96::1:17"],
                  type="NodePort", external_policy="Local"),
        m.endpoint_slice("local6", bridged.backends(*ALL, ipv6=True), [m.slice_port(80)], address_type="IPv6"),
        name="local6.yaml",
    )
    lines = bridged.run("bcl", "http", "[fd00:56::101]:30182", "--count", "20", "--timeout", "3")
    assert set(pods_of(lines)) == set(ALL), lines
    assert bridged.lab.pods["bcl"].ip6 not in client_ips_of(lines)


@pytest.mark.parametrize("size", [1400, 2000, 9000, 65000])
def test_udp_datagrams_of_any_size_from_a_bridged_pod(bridged: Cluster, size: int) -> None:
    """A datagram larger than the MTU leaves the pod as IP fragments; the bridge's netfilter
    pass reassembles it before the re-entry chain forwards it into pyproxy's veth pair,
    which must carry a whole datagram (up to 64 KiB), not only an MTU's worth. Echoed whole,
    over IPv4 and IPv6 (2000 bytes failed before the pair's MTU was raised)."""
    assert udp_echo_answers(bridged)
    bridged.apply(m.service("udp-echo6", "fd00:96::1:21", [m.port(5353, 5353, protocol="UDP")],
                            cluster_ips=["fd00:96::1:21"]),
                  m.endpoint_slice("udp-echo6", bridged.backends(*ALL, ipv6=True),
                                   [m.slice_port(5353, protocol="UDP")], address_type="IPv6"),
                  name="udp-echo6.yaml")
    for address in ("10.96.1.21:5353", "[fd00:96::1:21]:5353"):
        lines = bridged.run("bcl", "udp", address, "--size", str(size), "--count", "3", "--timeout", "3")
        assert len(lines) == 3 and all("whole=True" in line for line in lines), (address, lines)
