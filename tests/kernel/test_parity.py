"""kube-proxy parity on the real kernel: loadBalancerSourceRanges, ipMode Proxy, and the
--detect-local-mode modes, with clients inside and outside the ranges.

One cluster (uvloop, the default relay: these are kernel rules and model decisions, not byte
paths). The LAN client has a second address, 192.168.56.150, as a host outside the ranges;
`cl` is a pod on node1 on a routed veth (`vcl`), `cb` a pod on node1 on a bridge of its own
(`brpods`, 10.244.1.128/25, not one of pyproxy's pod bridges, with br_netfilter's IPv4 hook
off in node1 so plain routing reaches TPROXY); node1 itself is a client too.
Load-balancer IPs are in 10.96.100.0/24, which the client routes to node1 with the service
CIDR.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP, node_ip
from tests.kernel.conftest import Cluster, _cluster

pytestmark = pytest.mark.privileged

OUTSIDE = "192.168.56.150"  # a second address of the LAN client
ALL = ("pa", "pb", "pc")
CB_IP = "10.244.1.130"  # `cb`, the pod on brpods


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    for built in _cluster(("--event-loop", "uvloop"), client_addresses=(OUTSIDE,)):
        built.lab.add_pod("cl", "node1")
        add_bridged_pod(built, "cb", CB_IP)
        yield built


def add_bridged_pod(cluster: Cluster, name: str, ip: str) -> None:
    lab = cluster.lab
    lab.exec("node1", "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0", check=False)
    lab.exec("node1", "ip", "link", "add", "brpods", "type", "bridge")
    lab.exec("node1", "ip", "addr", "add", "10.244.1.129/25", "dev", "brpods")
    lab.exec("node1", "ip", "link", "set", "brpods", "up")
    lab.add_ns(name)
    lab.veth(name, "eth0", "node1", f"b{name}")
    lab.exec("node1", "ip", "link", "set", f"b{name}", "master", "brpods")
    lab.exec(name, "ip", "addr", "add", f"{ip}/25", "dev", "eth0")
    lab.exec(name, "ip", "route", "add", "default", "via", "10.244.1.129")


def pods_of(lines: list[str]) -> list[str]:
    return [re.search(r"(?:From=|pod=)(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def client_ips_of(lines: list[str]) -> list[str]:
    return [re.search(r"(?:ClientIP=|client=)(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def reaches(cluster: Cluster, ns: str, address: str, bind: str | None = None) -> bool:
    """One connection: True if it connects, False if it times out (a drop)."""
    args = ["--timeout", "0.5"] + (["--bind", bind] if bind else [])
    outcome = cluster.run(ns, "connect", address, *args)[0]
    assert outcome.startswith(("ok", "timeout")), outcome
    return outcome.startswith("ok")


def lb_service(name: str, cluster_ip: str, lb_ingress: list[dict[str, Any]], node_port: int,
               ranges: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    doc = m.service(name, cluster_ip, [m.port(80, 80, node_port=node_port)], type="LoadBalancer", **kwargs)
    doc["status"] = {"loadBalancer": {"ingress": lb_ingress}}
    if ranges is not None:
        doc["spec"]["loadBalancerSourceRanges"] = ranges
    return doc


def test_load_balancer_source_ranges(cluster: Cluster) -> None:
    lb = "10.96.100.1"
    slices = m.endpoint_slice("fw", cluster.backends(*ALL), [m.slice_port(80)])
    cluster.apply(lb_service("fw", "10.96.0.80", [{"ip": lb}], 30090, ranges=[f"{CLIENT_IP}/32"]), slices)
    assert set(pods_of(cluster.run("client", "http", f"{lb}:80", "--count", "12"))) <= set(ALL)
    assert not reaches(cluster, "client", f"{lb}:80", bind=OUTSIDE), "a host outside the ranges is dropped"
    assert not reaches(cluster, "cl", f"{lb}:80"), "a pod outside the ranges is dropped too (as kube-proxy)"
    assert not reaches(cluster, "node1", f"{lb}:80"), "and so is the node itself, outside the ranges"
    # only load-balancer IPs are guarded: the ClusterIP and NodePort of the same Service are not
    assert reaches(cluster, "client", "10.96.0.80:80", bind=OUTSIDE)
    assert reaches(cluster, "client", f"{node_ip(1)}:30090", bind=OUTSIDE)
    assert reaches(cluster, "cl", "10.96.0.80:80")

    # a range holding the node: the node, and every LAN host, get in; the pod still does not
    cluster.apply(lb_service("fw", "10.96.0.80", [{"ip": lb}], 30090, ranges=["192.168.56.0/24"]), slices)
    assert reaches(cluster, "client", f"{lb}:80", bind=OUTSIDE)
    assert reaches(cluster, "node1", f"{lb}:80")
    assert not reaches(cluster, "cl", f"{lb}:80")

    # 0.0.0.0/0 is no firewall at all; a bad range is reported and the others still apply
    cluster.apply(lb_service("fw", "10.96.0.80", [{"ip": lb}], 30090, ranges=["0.0.0.0/0"]), slices)
    assert reaches(cluster, "cl", f"{lb}:80")
    cluster.apply(lb_service("fw", "10.96.0.80", [{"ip": lb}], 30090, ranges=["nonsense", f"{CLIENT_IP}/32"]),
                  slices)
    assert "Service default/fw: spec.loadBalancerSourceRanges[0]" in cluster.log("node1")
    assert reaches(cluster, "client", f"{lb}:80") and not reaches(cluster, "client", f"{lb}:80", bind=OUTSIDE)
    cluster.apply(name="services.yaml")  # leave nothing behind for the other tests


def test_ip_mode_proxy_is_not_captured(cluster: Cluster) -> None:
    proxied, vip = "10.96.100.2", "10.96.100.3"
    cluster.apply(lb_service("ipmode", "10.96.0.81", [{"ip": proxied, "ipMode": "Proxy"}, {"ip": vip, "ipMode": "VIP"}],
                             30091),
                  m.endpoint_slice("ipmode", cluster.backends(*ALL), [m.slice_port(80)]))
    captured = cluster.lab.exec("node1", "nft", "list", "set", "ip", "pyproxy", "svc_capture").stdout
    assert f"{vip} . tcp . 80" in captured and proxied not in captured
    assert pods_of(cluster.run("client", "http", f"{vip}:80"))[0] in ALL
    assert not cluster.run("client", "connect", f"{proxied}:80", "--timeout", "1")[0].startswith("ok"), \
        "an ipMode Proxy address is left to the load balancer: the node does not answer for it"
    cluster.apply(name="services.yaml")


def test_configz_on_the_metrics_address(cluster: Cluster) -> None:
    """kube-proxy's /configz: the running proxy's effective configuration, as JSON."""
    from tests.kernel.test_health import fetch

    answer = fetch(cluster, "node1", "http://127.0.0.1:10249/configz")
    assert answer["status"] == 200 and answer["headers"]["Content-Type"] == "application/json"
    config = json.loads(answer["body"])["pyproxy.io"]
    assert config["kind"] == "PyProxyConfiguration"
    assert config["hostnameOverride"] == "node1" and config["eventLoop"] == "uvloop", "flags are applied"
    assert config["healthzBindAddress"] == "0.0.0.0:10256"


def test_proxy_mode_where_kube_proxy_names_its_mode(cluster: Cluster) -> None:
    """kube-proxy's /proxyMode (Kubernetes' e2e "should check kube-proxy urls" asks for a 200)."""
    from tests.kernel.test_health import fetch

    answer = fetch(cluster, "node1", "http://127.0.0.1:10249/proxyMode")
    assert (answer["status"], answer["body"]) == (200, "userspace"), answer


def restart_node1(cluster: Cluster, *args: str) -> None:
    """pyproxy on node1 again, with `args` (these tests come last: the module's cluster ends
    with them, so the last mode is never set back)."""
    cluster.lab.stop(cluster.proxies["node1"])
    before = cluster.syncs("node1")
    cluster.start_proxy("node1", *args)
    cluster.wait_for_log("node1", " synced ", before)


NODE1 = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
         "spec": {"podCIDRs": ["10.244.1.0/24"]},
         "status": {"addresses": [{"type": "InternalIP", "address": node_ip(1)}]}}


@pytest.mark.parametrize(("args", "detected"), [
    ((), {"cl": False, "cb": False}),  # ClusterCIDR without --cluster-cidr: only the node itself is local
    (("--cluster-cidr", "10.244.0.0/16"), {"cl": True, "cb": True}),
    (("--detect-local-mode", "NodeCIDR"), {"cl": True, "cb": True}),  # the Node's spec.podCIDRs (node.yaml)
    # the routed veths vpa and vcl; cb's veth is a bridge port, its route goes via brpods
    (("--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "v"), {"cl": True, "cb": False}),
    (("--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "brpods"), {"cl": False, "cb": True}),
], ids=["none", "ClusterCIDR", "NodeCIDR", "InterfaceNamePrefix", "BridgeInterface"])
def test_detect_local_mode_decides_the_short_circuit(cluster: Cluster, args: tuple[str, ...],
                                                     detected: dict[str, bool]) -> None:
    """A pod of node1 to a Local-policy load-balancer IP whose pods are all on node2: when
    node1 knows it for its pod, it is served from the cluster set (kube-proxy's
    short-circuit), keeping its own address (SPEC.md §5); when not, it is external traffic
    without a local endpoint, and dropped. Traffic from outside is dropped either way."""
    lb = "10.96.100.4"
    cluster.apply(NODE1, name="node.yaml", nodes=["node1"])
    cluster.apply(lb_service("lt", "10.96.0.82", [{"ip": lb}], 30092, external_policy="Local"),
                  m.endpoint_slice("lt", cluster.backends("pb", "pc"), [m.slice_port(80)]))
    if args:  # the first case is the proxy as the cluster started it
        restart_node1(cluster, *args)
    for pod, is_local in detected.items():
        if is_local:
            lines = cluster.run(pod, "http", f"{lb}:80", "--count", "4")
            assert set(pods_of(lines)) <= {"pb", "pc"}, (pod, lines)
            # served by the short-circuit, and, as a pod of node1 (its Node's podCIDRs), with its own address
            own = CB_IP if pod == "cb" else cluster.lab.pods[pod].ip
            assert set(client_ips_of(lines)) == {own}, (pod, lines)
        else:
            assert not reaches(cluster, pod, f"{lb}:80"), f"{pod} is not detected as a pod of node1: dropped"
    assert not reaches(cluster, "client", f"{lb}:80"), "outside traffic has no local endpoint on node1"
