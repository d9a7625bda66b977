# mypy: disable-error-code="union-attr,arg-type,index"
"""pyproxy in cluster mode against a real kube-apiserver: SCENARIOS.md through the API.

Pods: pa on node1; pb and pc on node2; `cl` (node1) is the in-cluster client. The API
server allocates every ClusterIP, NodePort and health check node port; tests read them back
from the created Service. Changes go through the API (patch, as `kubectl patch` does) and
each test waits for both proxies to sync them.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from typing import Any

import pytest
from kubernetes import client

from pyproxy.demo.lab import CLIENT_IP, node_ip
from tests.realapi.cluster import (
    ALL,
    OUTSIDE_IP,
    PODS,
    KubeCluster,
    client_ips_of,
    pods_of,
    port,
    service_body,
    unique,
)

pytestmark = [pytest.mark.realapi, pytest.mark.privileged]

HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]


def affinity_service(cluster: KubeCluster, timeout: int, **kwargs: object) -> tuple[str, str]:
    name = unique("sample-session-affinity")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(8080, 80, name="http")], type="LoadBalancer",
                                                  affinity_timeout=timeout, **kwargs))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        return str(svc.spec.cluster_ip)

    return name, cluster.change(create)


def test_cluster_ips_come_from_the_api_server(cluster: KubeCluster) -> None:
    name, ip = affinity_service(cluster, 10)
    assert ip.startswith("10.96.")
    assert pods_of(cluster.run("cl", "http", f"{ip}:8080"))[0] in ALL
    assert "Service: listed" in cluster.log("node1") and "EndpointSlice: listed" in cluster.log("node1")


def test_s1_clientip_affinity_sticks_and_expires(cluster: KubeCluster) -> None:
    _, ip = affinity_service(cluster, 3)
    first = pods_of(cluster.run("cl", "http", f"{ip}:8080"))[0]
    sliding = pods_of(cluster.run("cl", "http", f"{ip}:8080", "--count", "4", "--interval", "1"))
    assert set(sliding) == {first}, "requests within the timeout stay on the same pod"
    seen = {first}
    for _ in range(8):  # after > 3 s of silence each request is a fresh pick
        time.sleep(3.5)
        seen.add(pods_of(cluster.run("cl", "http", f"{ip}:8080"))[0])
        if len(seen) > 1:
            break
    assert len(seen) > 1, "an expired entry allows a different pod"


def test_s2_affinity_switched_and_timeout_changed_live(cluster: KubeCluster) -> None:
    name, ip = affinity_service(cluster, 10)
    cluster.change(lambda: cluster.patch_service(name, {"spec": {"sessionAffinity": "None"}}))
    spread = pods_of(cluster.run("cl", "http", f"{ip}:8080", "--count", "30"))
    assert len(set(spread)) > 1, "affinity None spreads requests"
    cluster.change(lambda: cluster.patch_service(name, {"spec": {"sessionAffinity": "ClientIP"}}))
    sticky = pods_of(cluster.run("cl", "http", f"{ip}:8080", "--count", "20"))
    assert len(set(sticky)) == 1, "ClientIP again: sticky"
    svc = cluster.core.read_namespaced_service(name, "default")
    assert svc.spec.session_affinity_config.client_ip.timeout_seconds == 10800  # the API server's default
    cluster.change(lambda: cluster.patch_service(
        name, {"spec": {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}}}}))
    seen = set()
    for _ in range(8):
        seen.add(pods_of(cluster.run("cl", "http", f"{ip}:8080"))[0])
        if len(seen) > 1:
            break
        time.sleep(2.5)
    assert len(seen) > 1, "the shorter timeout applies without a restart"


def test_s3_hundred_requests_one_pod_then_spread(cluster: KubeCluster) -> None:
    name = unique("whoami")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")], affinity_timeout=10800))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    counts = collections.Counter(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "100")))
    assert len(counts) == 1 and sum(counts.values()) == 100
    cluster.change(lambda: cluster.patch_service(name, {"spec": {"sessionAffinity": "None"}}))
    counts = collections.Counter(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "100")))
    assert set(counts) == set(ALL)


def test_s5_external_traffic_policy_cluster_and_local(cluster: KubeCluster) -> None:
    name = unique("s5")

    def create() -> int:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")], type="NodePort"))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        return int(svc.spec.ports[0].node_port)

    node_port = cluster.change(create)
    assert 30000 <= node_port <= 32767
    on1, on2 = f"{node_ip(1)}:{node_port}", f"{node_ip(2)}:{node_port}"
    lines = cluster.run("client", "http", on1, "--count", "30")
    assert set(pods_of(lines)) == set(ALL), "Cluster policy forwards to pods on every node"
    assert CLIENT_IP not in client_ips_of(lines), "Cluster policy: pods see a node address"

    cluster.change(lambda: cluster.patch_service(name, {"spec": {"externalTrafficPolicy": "Local"}}))
    node1 = cluster.run("client", "http", on1, "--count", "10")
    node2 = cluster.run("client", "http", on2, "--count", "20")
    assert set(pods_of(node1)) == {"pa"}
    assert set(pods_of(node2)) == {"pb", "pc"}
    assert set(client_ips_of(node1 + node2)) == {CLIENT_IP}, "Local policy keeps the client's IP"

    cluster.change(lambda: cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pb", "pc"), HTTP)))
    assert cluster.run("client", "connect", on1, "--timeout", "1")[0].startswith("timeout")
    assert set(pods_of(cluster.run("client", "http", on2, "--count", "5"))) <= {"pb", "pc"}


def test_s6_named_target_port(cluster: KubeCluster) -> None:
    name = unique("named")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, "web8080", name="web")]))
        # what the EndpointSlice controller writes after resolving the pods' port name
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL,
                                             [{"name": "web", "port": 8080, "protocol": "TCP"}]))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    svc = cluster.core.read_namespaced_service(name, "default")
    assert svc.spec.ports[0].target_port == "web8080"
    lines = cluster.run("client", "who", f"{ip}:80", "--count", "6")
    assert all("port=8080" in line for line in lines), lines


def test_s7_multi_port_service(cluster: KubeCluster) -> None:
    name = unique("multi")

    def create() -> str:
        svc = cluster.create_service(service_body(
            name, [port(80, "http", name="http"), port(443, "https", name="https")]))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, [
            {"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "https", "port": 8443, "protocol": "TCP"}]))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    # 40 connections in all: a uniform pick missing one of three pods is 3 x (2/3)^40
    http = cluster.run("client", "who", f"{ip}:80", "--count", "20")
    https = cluster.run("client", "who", f"{ip}:443", "--count", "20")
    assert all("port=8080" in line for line in http), http
    assert all("port=8443" in line for line in https), https
    assert set(pods_of(http + https)) == set(ALL)


def test_service_proxy_name_label_hands_the_service_to_another_proxy(cluster: KubeCluster) -> None:
    name = unique("other-proxy")
    label = "service.kubernetes.io/service-proxy-name"

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")], labels={label: "other"}))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pa",), HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert not cluster.run("cl", "connect", f"{ip}:80", "--timeout", "1")[0].startswith("ok"), \
        "a Service labelled for another proxy is not ours"
    cluster.change(lambda: cluster.patch_service(name, {"metadata": {"labels": {label: None}}}))
    assert pods_of(cluster.run("cl", "http", f"{ip}:80")) == ["pa"], "without the label it is served"


def test_headless_labelled_slices_are_ignored(cluster: KubeCluster) -> None:
    name = unique("headless-slice")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{name}-h", name, ("pa",), HTTP,
                                             labels={"service.kubernetes.io/headless": ""}))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pb",), HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "12"))) == {"pb"}


def test_terminating_endpoints_serve_when_no_pod_is_ready(cluster: KubeCluster) -> None:
    name = unique("terminating")
    draining = {"ready": False, "serving": True, "terminating": True}

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pa", "pb"), HTTP,
                                             conditions={"pa": draining, "pb": draining}))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "12"))) == {"pa", "pb"}, \
        "no ready endpoint: the serving, terminating ones are used"
    cluster.change(lambda: cluster.put_slice(cluster.slice_body(
        f"{name}-1", name, ("pa", "pb", "pc"), HTTP, conditions={"pa": draining, "pb": draining})))
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "12"))) == {"pc"}, \
        "a ready endpoint wins over terminating ones"


def test_health_check_node_port_follows_local_pods(cluster: KubeCluster) -> None:
    name = unique("lb-local")

    def create() -> int:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")], type="LoadBalancer",
                                                  external_policy="Local"))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pa", "pb"), HTTP))
        return int(svc.spec.health_check_node_port)

    health_port = cluster.change(create)

    def local_endpoints(node: int) -> int:
        body = json.loads(cluster.run("client", "http", f"{node_ip(node)}:{health_port}")[0])
        assert body["service"] == {"namespace": "default", "name": name}
        return int(body["localEndpoints"])

    cluster.eventually(lambda: local_endpoints(1) == 1 and local_endpoints(2) == 1, what="one local pod per node")
    cluster.change(lambda: cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pb", "pc"), HTTP)))
    cluster.eventually(lambda: local_endpoints(1) == 0 and local_endpoints(2) == 2, what="pa gone, pc added")


def test_state_is_kept_while_the_api_server_is_away(cluster: KubeCluster) -> None:
    name = unique("restart")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    cluster.kube.stop_apiserver()
    try:
        time.sleep(2)  # long enough for every watch to notice and start backing off
        assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "30"))) == set(ALL), \
            "traffic flows from the last good state while the API server is down"
        assert "last good state keeps serving" in cluster.log("node1")
    finally:
        cluster.kube.start_apiserver()
    cluster.change(lambda: cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pc",), HTTP)))
    assert set(pods_of(cluster.run("cl", "http", f"{ip}:80", "--count", "10"))) == {"pc"}, \
        "changes made after the restart are applied"


def test_invalid_service_is_skipped_with_a_log_line_and_an_event(cluster: KubeCluster) -> None:
    name = unique("sctp")
    good = unique("next-to-sctp")

    def create() -> str:
        cluster.create_service(service_body(name, [{"name": "s", "port": 80, "targetPort": 80, "protocol": "SCTP"}]))
        svc = cluster.create_service(service_body(good, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{good}-1", good, ("pa",), HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert f"skipping invalid object: Service default/{name}" in cluster.log("node1")
    assert pods_of(cluster.run("cl", "http", f"{ip}:80")) == ["pa"], "other Services are not disturbed"
    events = client.EventsV1Api(cluster.api)

    def posted() -> bool:
        found = events.list_namespaced_event("default", field_selector=f"regarding.name={name}").items
        return {e.reporting_instance for e in found} == {"pyproxy-node1", "pyproxy-node2"}

    cluster.eventually(posted, what="a Warning Event from each proxy")


def test_the_node_watch_feeds_healthz(cluster: KubeCluster) -> None:
    def get(path: str) -> tuple[int, dict[str, object]]:
        code = ("import json, urllib.request, urllib.error\n"
                f"try: r = urllib.request.urlopen('http://{node_ip(2)}:10256{path}', timeout=5)\n"
                "except urllib.error.HTTPError as e: r = e\n"
                "with r: print(r.status, r.read().decode())")
        status, _, body = cluster.lab.exec("client", sys.executable, "-c", code).stdout.strip().partition(" ")
        return int(status), json.loads(body)

    taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
    cluster.change(lambda: cluster.core.patch_node("node2", {"spec": {"taints": [taint]}}), nodes=["node2"])
    def ineligible() -> bool:
        status, body = get("/healthz")
        return status == 503 and body["nodeEligible"] is False

    cluster.eventually(ineligible, what="node2 /healthz 503 for the autoscaler taint")
    assert get("/livez")[0] == 200, "/livez ignores the node"
    cluster.change(lambda: cluster.core.patch_node("node2", {"spec": {"taints": None}}), nodes=["node2"])
    cluster.eventually(lambda: get("/healthz")[0] == 200, what="node2 eligible again")


def test_deletions_through_the_api(cluster: KubeCluster) -> None:
    name = unique("deleted")

    def create() -> str:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")]))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pa",), HTTP))
        return str(svc.spec.cluster_ip)

    ip = cluster.change(create)
    assert pods_of(cluster.run("cl", "http", f"{ip}:80")) == ["pa"]
    cluster.change(lambda: cluster.discovery.delete_namespaced_endpoint_slice(f"{name}-1", "default"))
    assert cluster.run("cl", "connect", f"{ip}:80", "--timeout", "2")[0].startswith("refused"), \
        "no endpoints left: refused"
    cluster.change(lambda: cluster.core.delete_namespaced_service(name, "default"))
    assert not cluster.run("cl", "connect", f"{ip}:80", "--timeout", "1")[0].startswith(("ok", "refused")), \
        "a deleted Service is no longer proxied"


# --- kube-proxy parity through the API: node1 runs with --detect-local-mode NodeCIDR and
# --nodeport-addresses primary (cluster.PROXY_ARGS), node2 with the defaults.


def reaches(cluster: KubeCluster, ns: str, address: str, *args: str) -> str:
    """One connection's outcome: ok, refused or timeout (a drop)."""
    return cluster.run(ns, "connect", address, "--timeout", "0.5", *args)[0].split()[0]


def test_source_ranges_and_ip_mode_through_the_api(cluster: KubeCluster) -> None:
    name = unique("lb-ranges")
    vip, proxied = "10.97.0.10", "10.97.0.11"

    def create() -> None:
        body = service_body(name, [port(80, 80, name="http")], type="LoadBalancer")
        body["spec"]["loadBalancerSourceRanges"] = [f"{CLIENT_IP}/32"]
        cluster.create_service(body)
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ALL, HTTP))
        cluster.core.patch_namespaced_service_status(name, "default", {"status": {"loadBalancer": {"ingress": [
            {"ip": vip, "ipMode": "VIP"}, {"ip": proxied, "ipMode": "Proxy"}]}}})

    cluster.change(create)
    assert pods_of(cluster.run("client", "http", f"{vip}:80"))[0] in ALL, "inside the range"
    assert reaches(cluster, "client", f"{vip}:80", "--bind", OUTSIDE_IP) == "timeout", "outside: dropped"
    assert reaches(cluster, "cl", f"{vip}:80") == "timeout", "a pod outside the ranges is dropped as well"
    captured = cluster.lab.exec("node1", "nft", "list", "set", "ip", "pyproxy", "svc_capture").stdout
    assert f"{vip} . tcp . 80" in captured and proxied not in captured, "ipMode Proxy: not captured"
    assert reaches(cluster, "client", f"{proxied}:80") != "ok"

    cluster.change(lambda: cluster.patch_service(name, {"spec": {"loadBalancerSourceRanges": ["192.168.56.0/24"]}}))
    assert reaches(cluster, "client", f"{vip}:80", "--bind", OUTSIDE_IP) == "ok", "the new range applies live"


def hinted_slice(cluster: KubeCluster, name: str, hints: dict[str, dict[str, list[dict[str, str]]]]) -> dict[str, Any]:
    """A slice as the EndpointSlice controller writes it for a trafficDistribution: per endpoint
    `hints.forZones` (and for PreferSameNode `hints.forNodes`); a pod left out has no hints."""
    body = cluster.slice_body(f"{name}-1", name, ALL, HTTP)
    for endpoint in body["endpoints"]:
        pod = endpoint["targetRef"]["name"]
        if pod in hints:
            endpoint["hints"] = hints[pod]
    return body


def zone_of(pod: str) -> str:
    return {"node1": "zone-1", "node2": "zone-2"}[PODS[pod]]


def test_traffic_distribution_from_hints(cluster: KubeCluster) -> None:
    name = unique("topology")

    def create() -> int:
        body = service_body(name, [port(80, 80, name="http")], type="NodePort")
        body["spec"]["trafficDistribution"] = "PreferSameZone"
        svc = cluster.create_service(body)
        cluster.put_slice(hinted_slice(cluster, name, {p: {"forZones": [{"name": zone_of(p)}]} for p in ALL}))
        return int(svc.spec.ports[0].node_port)

    node_port = cluster.change(create)
    via1, via2 = f"{node_ip(1)}:{node_port}", f"{node_ip(2)}:{node_port}"
    assert set(pods_of(cluster.run("client", "http", via1, "--count", "12"))) == {"pa"}, "node1 is in zone-1"
    assert set(pods_of(cluster.run("client", "http", via2, "--count", "20"))) == {"pb", "pc"}, "node2: zone-2"

    # PreferSameNode, with both nodes in one zone: the node hints decide, not the zone
    cluster.change(lambda: cluster.core.patch_node("node2", {"metadata": {"labels": {
        "topology.kubernetes.io/zone": "zone-1"}}}), nodes=["node2"])  # node1 watches only its own Node
    try:
        def same_node(pods: tuple[str, ...]) -> dict[str, Any]:
            return hinted_slice(cluster, name, {p: {"forNodes": [{"name": PODS[p]}], "forZones": [{"name": "zone-1"}]}
                                                for p in pods})

        cluster.change(lambda: (cluster.patch_service(name, {"spec": {"trafficDistribution": "PreferSameNode"}}),
                                cluster.put_slice(same_node(ALL))))
        assert set(pods_of(cluster.run("client", "http", via1, "--count", "12"))) == {"pa"}
        assert set(pods_of(cluster.run("client", "http", via2, "--count", "20"))) == {"pb", "pc"}
        # one endpoint without hints (the controller has not caught up): no topology at all
        cluster.change(lambda: cluster.put_slice(same_node(("pa", "pb"))))
        assert set(pods_of(cluster.run("client", "http", via1, "--count", "30"))) == set(ALL)
    finally:
        cluster.change(lambda: cluster.core.patch_node("node2", {"metadata": {"labels": {
            "topology.kubernetes.io/zone": "zone-2"}}}), nodes=["node2"])


def test_node_cidr_and_primary_nodeport_addresses_from_the_node_object(cluster: KubeCluster) -> None:
    """node1: its pods are the Node's spec.podCIDRs (so its pod `cl` short-circuits to a
    Local-policy load-balancer IP whose pods are on node2, keeping its own address as a pod
    of node1: SPEC.md §5), and NodePorts are served on the Node's InternalIP only; node2
    (defaults) serves them on every local address."""
    name = unique("node-object")
    lb = "10.97.0.20"

    def create() -> int:
        svc = cluster.create_service(service_body(name, [port(80, 80, name="http")], type="LoadBalancer",
                                                  external_policy="Local"))
        cluster.put_slice(cluster.slice_body(f"{name}-1", name, ("pb", "pc"), HTTP))
        cluster.core.patch_namespaced_service_status(name, "default", {"status": {"loadBalancer": {"ingress": [
            {"ip": lb}]}}})
        return int(svc.spec.ports[0].node_port)

    node_port = cluster.change(create)
    assert "local pods (detect-local-mode NodeCIDR): 10.244.1.0/24" in cluster.log("node1")
    lines = cluster.run("cl", "http", f"{lb}:80", "--count", "4")
    assert set(pods_of(lines)) <= {"pb", "pc"}, "a pod of node1: served from the cluster set"
    assert set(client_ips_of(lines)) == {cluster.lab.pods["cl"].ip}, lines  # a pod of node1 keeps its address
    assert reaches(cluster, "client", f"{lb}:80") == "timeout", "from outside: no local endpoint on node1"

    assert reaches(cluster, "client", f"{node_ip(1)}:{node_port}") == "timeout", "Local, no pod on node1: dropped"
    assert reaches(cluster, "client", f"10.244.1.1:{node_port}") == "refused", \
        "node1's other address is not a primary one: its NodePort is not captured"
    assert pods_of(cluster.run("client", "http", f"10.244.2.1:{node_port}"))[0] in ("pb", "pc"), \
        "node2 (no --nodeport-addresses) serves NodePorts on every local address"
