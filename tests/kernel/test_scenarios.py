"""SCENARIOS.md on the real kernel: clients in namespaces, pyproxy on two nodes, echo pods.

Pods: pa on node1; pb and pc on node2. The client sits on the LAN (192.168.56.100) with the
service CIDR routed to node1. A test pod `cl` on node1 acts as the in-cluster client.
"""

from __future__ import annotations

import collections
import re
import time

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.privileged

SVC_IP = "10.96.0.10"
ALL = ("pa", "pb", "pc")


def pods_of(lines: list[str]) -> list[str]:
    return [re.search(r"(?:From=|pod=)(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def client_ips_of(lines: list[str]) -> list[str]:
    return [re.search(r"(?:ClientIP=|client=)(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def client_pod(cluster: Cluster) -> str:
    if "cl" not in cluster.lab.pods:
        cluster.lab.add_pod("cl", "node1")
    return "cl"


def affinity_service(cluster: Cluster, timeout: int | None, **kwargs: object) -> None:
    cluster.apply(
        m.service("sample-session-affinity", SVC_IP, [m.port(8080, 80, node_port=30084)], type="LoadBalancer",
                  affinity_timeout=timeout, **kwargs),  # type: ignore[arg-type]
        m.endpoint_slice("sample-session-affinity", cluster.backends(*ALL), [m.slice_port(80)]),
    )


def test_s1_clientip_affinity_sticks_slides_and_expires(cluster: Cluster, client_pod: str) -> None:
    affinity_service(cluster, timeout=2)
    first = pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080"))[0]
    # one request a second for 5 s: longer than the timeout, but each one slides the expiry
    sliding = pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080", "--count", "6", "--interval", "1"))
    assert sliding == [first] * 6
    # after more than the timeout of silence the pick is fresh: eventually another pod
    seen = set()
    for _ in range(10):
        time.sleep(2.3)
        seen.add(pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080"))[0])
        if seen - {first}:
            break
    assert seen - {first}, f"always {first} after the affinity timeout expired"


def test_s2_affinity_switched_and_timeout_changed_live(cluster: Cluster, client_pod: str) -> None:
    affinity_service(cluster, timeout=None)
    spread = pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080", "--count", "30"))
    assert len(set(spread)) >= 2, "affinity None must spread new connections"
    affinity_service(cluster, timeout=60)
    sticky = pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080", "--count", "20"))
    assert len(set(sticky)) == 1
    # 60 s -> 1 s: after 1.5 s of silence the pin has expired, so picks are fresh again
    affinity_service(cluster, timeout=1)
    seen = set()
    for _ in range(10):
        time.sleep(1.5)
        seen.add(pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080"))[0])
        if len(seen) > 1:
            break
    assert len(seen) > 1, "a shortened timeout must take effect without a restart"
    # 1 s -> 30 s: the next silences of 1.5 s no longer break the pin
    affinity_service(cluster, timeout=30)
    pinned = pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080"))[0]
    for _ in range(3):
        time.sleep(1.5)
        assert pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080")) == [pinned]


def test_s3_hundred_requests_one_pod_then_spread(cluster: Cluster, client_pod: str) -> None:
    affinity_service(cluster, timeout=10800)
    counts = collections.Counter(pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080", "--count", "100")))
    assert len(counts) == 1 and sum(counts.values()) == 100, counts
    affinity_service(cluster, timeout=None)
    counts = collections.Counter(pods_of(cluster.run(client_pod, "http", f"{SVC_IP}:8080", "--count", "100")))
    assert set(counts) == set(ALL), counts
    assert min(counts.values()) >= 15, f"uneven spread: {counts}"


def test_s4_nodeport_and_lb_with_affinity_per_node(cluster: Cluster) -> None:
    lb_ip = "192.168.57.20"
    cluster.lab.route_client("192.168.57.0/24", "node1")
    affinity_service(cluster, timeout=10800, lb_ips=[lb_ip])
    for target in ("192.168.56.101:30084", "192.168.56.102:30084", f"{lb_ip}:8080"):
        lines = cluster.run("client", "http", target, "--count", "10")
        assert len(set(pods_of(lines))) == 1, f"{target}: {lines}"


def test_s5_external_traffic_policy_cluster_and_local(cluster: Cluster) -> None:
    ports = [m.port(80, 80, node_port=30085)]
    slice_ = m.endpoint_slice("s5", cluster.backends(*ALL), [m.slice_port(80)])
    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort"), slice_)
    lines = cluster.run("client", "http", "192.168.56.101:30085", "--count", "30")
    assert set(pods_of(lines)) == set(ALL), "Cluster policy forwards to pods on every node"
    assert CLIENT_IP not in client_ips_of(lines), "Cluster policy: pods see a node address"

    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort", external_policy="Local"), slice_)
    node1 = cluster.run("client", "http", "192.168.56.101:30085", "--count", "10")
    node2 = cluster.run("client", "http", "192.168.56.102:30085", "--count", "20")
    assert set(pods_of(node1)) == {"pa"}
    assert set(pods_of(node2)) == {"pb", "pc"}
    assert set(client_ips_of(node1 + node2)) == {CLIENT_IP}, "Local policy keeps the client's IP"

    # no local endpoint on node1: its traffic is dropped; node2 keeps serving
    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort", external_policy="Local"),
                  m.endpoint_slice("s5", cluster.backends("pb", "pc"), [m.slice_port(80)]))
    assert cluster.run("client", "connect", "192.168.56.101:30085", "--timeout", "1")[0].startswith("timeout")
    assert set(pods_of(cluster.run("client", "http", "192.168.56.102:30085", "--count", "5"))) <= {"pb", "pc"}
    # the node itself short-circuits to the cluster set (kube-proxy's behaviour)
    assert pods_of(cluster.run("node1", "http", "192.168.56.101:30085"))[0] in ("pb", "pc")


def test_s6_named_target_port(cluster: Cluster) -> None:
    cluster.apply(
        m.service("named", "10.96.0.12", [m.port(80, "web8080", name="web")]),
        m.endpoint_slice("named", cluster.backends(*ALL), [m.slice_port(8080, name="web")]),
    )
    lines = cluster.run("client", "who", "10.96.0.12:80", "--count", "6")
    assert all("port=8080" in line for line in lines), lines


def test_s7_multi_port_service(cluster: Cluster) -> None:
    cluster.apply(
        m.service("multi", "10.96.0.13", [m.port(80, "http", name="http"), m.port(443, "https", name="https")]),
        m.endpoint_slice("multi", cluster.backends(*ALL),
                         [m.slice_port(8080, name="http"), m.slice_port(8443, name="https")]),
    )
    # 40 connections in all: a uniform pick missing one of three pods is 3 x (2/3)^40
    http = cluster.run("client", "who", "10.96.0.13:80", "--count", "20")
    https = cluster.run("client", "who", "10.96.0.13:443", "--count", "20")
    assert all("port=8080" in line for line in http), http
    assert all("port=8443" in line for line in https), https
    assert set(pods_of(http + https)) == set(ALL)


def test_s8_cluster_ip_from_node_and_pod(cluster: Cluster, client_pod: str) -> None:
    cluster.apply(
        m.service("plain", "10.96.0.14", [m.port(80, 80)]),
        m.endpoint_slice("plain", cluster.backends(*ALL), [m.slice_port(80)]),
    )
    for where in ("node1", "node2", client_pod, "pb"):
        lines = cluster.run(where, "who", "10.96.0.14:80", "--count", "3")
        assert set(pods_of(lines)) <= set(ALL) and len(lines) == 3, f"{where}: {lines}"


def test_external_ips_from_another_host_the_node_and_a_pod(cluster: Cluster, client_pod: str) -> None:
    cluster.lab.route_client("192.168.57.0/24", "node1")
    cluster.apply(
        m.service("ext", "10.96.0.15", [m.port(80, 80), m.port(8080, 8080, name="alt")],
                  external_ips=["192.168.57.10"]),
        m.endpoint_slice("ext", cluster.backends(*ALL), [m.slice_port(80), m.slice_port(8080, name="alt")]),
    )
    for where in ("client", "node1", client_pod):
        lines = cluster.run(where, "who", "192.168.57.10:80", "--count", "6")
        assert len(lines) == 6 and all(line.startswith("pod=") for line in lines), f"{where}: {lines}"
        assert set(pods_of(lines)) <= set(ALL), f"{where}: {lines}"
        assert all("port=80" in line for line in lines), lines
    # the same address on a second port maps to that port's endpoints
    assert all("port=8080" in line for line in cluster.run("client", "who", "192.168.57.10:8080", "--count", "3"))


def test_no_endpoints_is_refused_fast(cluster: Cluster, client_pod: str) -> None:
    cluster.apply(
        m.service("empty", "10.96.0.16", [m.port(80, 80, node_port=30086)], type="NodePort"),
        m.endpoint_slice("empty", [], [m.slice_port(80)]),
    )
    for where, target in (("client", "10.96.0.16:80"), ("client", "192.168.56.101:30086"),
                          (client_pod, "10.96.0.16:80"), ("node1", "10.96.0.16:80")):
        outcome, ms = cluster.run(where, "connect", target, "--timeout", "3")[0].split()
        assert outcome == "refused", f"{where} -> {target}: {outcome}"
        assert float(ms) < 100, f"{where} -> {target}: refusal took {ms} ms"
