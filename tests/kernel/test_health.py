"""Health and metrics on the real kernel (SPEC.md §6): pyproxy on two namespace nodes.

Pods: pa on node1; pb and pc on node2. The client (192.168.56.100) asks each node's
address directly, as a cloud load balancer's health checker would; /metrics is read from
127.0.0.1 inside a node's namespace (its default bind address).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import node_ip
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.privileged

SVC_IP = "10.96.0.40"
NODE_PORT = 30400
HC_PORT = 32000
NODES = {"node1": node_ip(1), "node2": node_ip(2)}

FETCH = """
import json, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], method=sys.argv[2])
try:
    with urllib.request.urlopen(request, timeout=5) as r:
        status, headers, body = r.status, dict(r.headers), r.read()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, dict(e.headers), e.read()
    e.close()
print(json.dumps({"status": status, "headers": headers, "body": body.decode()}))
"""


def fetch(cluster: Cluster, ns: str, url: str, method: str = "GET") -> dict[str, Any]:
    result = cluster.lab.exec(ns, sys.executable, "-c", FETCH, url, method, timeout=15)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def until(what: str, probe: Callable[[], dict[str, Any]], ok: Callable[[dict[str, Any]], bool],
          timeout: float = 10) -> dict[str, Any]:
    """Probe until `ok` (the health check servers open right after the sync that wants them)."""
    deadline = time.monotonic() + timeout
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            answer = probe()
        except Exception as err:  # connection refused while the server is not open yet
            answer = {"error": str(err)}
        if ok(answer):
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{what}: last answer {answer}")


def health_check(cluster: Cluster, node: str, status: int, local: int, path: str = "/", method: str = "GET") -> dict[str, Any]:
    answer = until(
        f"health check on {node} expecting {status}/{local}",
        lambda: fetch(cluster, "client", f"http://{NODES[node]}:{HC_PORT}{path}", method),
        lambda a: a.get("status") == status and json.loads(a["body"]).get("localEndpoints") == local,
    )
    return answer


def lb_local(cluster: Cluster, *backends: m.Backend, hc_port: int = HC_PORT, name: str = "lb-local",
             cluster_ip: str = SVC_IP, node_port: int = NODE_PORT) -> list[dict[str, Any]]:
    return [
        m.service(name, cluster_ip, [m.port(80, 80, node_port=node_port)], type="LoadBalancer",
                  external_policy="Local", health_check_node_port=hc_port),
        m.endpoint_slice(name, list(backends), [m.slice_port(80)]),
    ]


def test_health_check_node_port_follows_local_endpoints(cluster: Cluster) -> None:
    cluster.apply(*lb_local(cluster, *cluster.backends("pa")))
    on1 = health_check(cluster, "node1", 200, 1)
    assert json.loads(on1["body"]) == {"service": {"namespace": "default", "name": "lb-local"},
                                       "localEndpoints": 1, "serviceProxyHealthy": True}
    assert on1["headers"]["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert on1["headers"]["Content-Type"] == "application/json"
    assert on1["headers"]["X-Content-Type-Options"] == "nosniff"
    on2 = health_check(cluster, "node2", 503, 0)
    assert on2["headers"]["X-Load-Balancing-Endpoint-Weight"] == "0"
    # any path, any method
    health_check(cluster, "node1", 200, 1, path="/anything/at/all", method="POST")

    # the pods move to node2: the answers flip
    cluster.apply(*lb_local(cluster, *cluster.backends("pb", "pc")))
    health_check(cluster, "node1", 503, 0)
    on2 = health_check(cluster, "node2", 200, 2)
    assert on2["headers"]["X-Load-Balancing-Endpoint-Weight"] == "2"

    # a terminating pod is not counted (the LB drains it while its traffic carries on)
    terminating = m.Backend(cluster.lab.pods["pb"].ip, "node2", ready=False, serving=True, terminating=True)
    cluster.apply(*lb_local(cluster, terminating, *cluster.backends("pc")))
    health_check(cluster, "node2", 200, 1)

    # the Service goes away: so does its health check server
    cluster.apply(m.service("other", "10.96.0.41", [m.port(80, 80)]))
    until("health check closed", lambda: fetch(cluster, "client", f"http://{NODES['node2']}:{HC_PORT}/"),
          lambda a: "error" in a)


def test_busy_health_check_port_is_retried_not_fatal(cluster: Cluster) -> None:
    blocker_log = cluster.workdir / "blocker.log"
    script = ("import socket, time\n"
              "s = socket.socket()\n"
              "s.bind(('0.0.0.0', 32001))\n"
              "s.listen()\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n"
              "s.close()\n")
    blocker = cluster.lab.spawn("node1", [sys.executable, "-c", script], log=blocker_log)
    try:
        until("blocker listening", lambda: {"ready": blocker_log.exists() and "ready" in blocker_log.read_text()},
              lambda a: bool(a["ready"]))
        cluster.apply(*lb_local(cluster, *cluster.backends("pa"), hc_port=32001, name="busy-hc"), nodes=["node1"])
        deadline = time.monotonic() + 10
        while "Service default/busy-hc: cannot open health check node port 32001" not in cluster.log("node1"):
            assert time.monotonic() < deadline, cluster.log("node1")[-2000:]
            time.sleep(0.1)
        assert cluster.proxies["node1"].poll() is None
    finally:
        cluster.lab.stop(blocker)
    # the next sync (here: for an endpoint on another node) opens it
    cluster.apply(*lb_local(cluster, *cluster.backends("pa", "pb"), hc_port=32001, name="busy-hc"), nodes=["node1"])
    until("health check opened after the port freed up",
          lambda: fetch(cluster, "client", f"http://{NODES['node1']}:32001/"),
          lambda a: a.get("status") == 200)


def test_healthz_and_livez(cluster: Cluster) -> None:
    for path in ("/healthz", "/livez"):
        answer = fetch(cluster, "client", f"http://{NODES['node1']}:10256{path}")
        assert answer["status"] == 200, answer
        assert answer["headers"]["Content-Type"] == "application/json"
        assert answer["headers"]["X-Content-Type-Options"] == "nosniff"
        body = json.loads(answer["body"])
        assert body["lastUpdated"] and body["currentTime"]
        assert ("nodeEligible" in body) == (path == "/healthz")
    assert fetch(cluster, "client", f"http://{NODES['node1']}:10256/other")["status"] == 404

    # node2 is being scaled away: /healthz says so, /livez does not care
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node2"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}
    cluster.apply(node, name="node.yaml", nodes=["node2"])
    try:
        healthz = fetch(cluster, "client", f"http://{NODES['node2']}:10256/healthz")
        assert healthz["status"] == 503 and json.loads(healthz["body"])["nodeEligible"] is False
        assert fetch(cluster, "client", f"http://{NODES['node2']}:10256/livez")["status"] == 200
    finally:
        node["spec"] = {}
        cluster.apply(node, name="node.yaml", nodes=["node2"])
    healthz = fetch(cluster, "client", f"http://{NODES['node2']}:10256/healthz")
    assert healthz["status"] == 200 and json.loads(healthz["body"])["nodeEligible"] is True


def metrics(cluster: Cluster, node: str) -> str:
    answer = fetch(cluster, node, "http://127.0.0.1:10249/metrics")
    assert answer["status"] == 200
    assert answer["headers"]["Content-Type"].startswith("text/plain")
    text: str = answer["body"]
    return text


def sample(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(w in head for w in want):
            return float(value)
    return 0.0


def test_metrics_names_and_counters_that_move(cluster: Cluster) -> None:
    cluster.apply(*lb_local(cluster, *cluster.backends("pa")))
    before = metrics(cluster, "node1")
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket", "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending", "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    ):
        assert f"\n{name}" in before, name
    assert sample(before, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > time.time() - 3600
    port = {"namespace": "default", "service": "lb-local", "protocol": "TCP"}
    connections = sample(before, "pyproxy_connections_total", **port)
    sent = sample(before, "pyproxy_bytes_total", direction="to_client", **port)
    lines = cluster.run("client", "http", f"{NODES['node1']}:{NODE_PORT}", "--count", "3")
    assert len(lines) == 3, lines
    fetch(cluster, "client", f"http://{NODES['node1']}:10256/healthz")
    after = until("counters moved", lambda: {"text": metrics(cluster, "node1")},
                  lambda a: sample(a["text"], "pyproxy_connections_total", **port) >= connections + 3)["text"]
    assert sample(after, "pyproxy_bytes_total", direction="to_client", **port) > sent
    assert sample(after, "pyproxy_bytes_total", direction="to_endpoint", **port) > 0
    assert sample(after, "kubeproxy_proxy_healthz_total", code="200") >= 1
    assert sample(after, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
    # node2 has no local endpoint for this Local Service
    assert sample(metrics(cluster, "node2"), "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                  traffic_policy="external") >= 1


RELAYS = {"splice": "engine", "pure-asyncio": "twin"}  # conftest.VARIANTS -> pyproxy_tcp_relay_info's label


def test_metrics_name_the_tcp_relay_serving(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    """An operator sees from /metrics alone whether a node runs the compiled engine or its
    slower twin: one info sample, 1, labelled with the relay this process started."""
    wanted = RELAYS[request.node.callspec.params["cluster"]]
    for node in ("node1", "node2"):
        text = metrics(cluster, node)
        relays = [line for line in text.splitlines() if line.startswith("pyproxy_tcp_relay_info{")]
        assert relays == [f'pyproxy_tcp_relay_info{{relay="{wanted}"}} 1.0'], relays
