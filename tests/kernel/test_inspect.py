"""The debug API and `pyproxy inspect` against running proxies on the real kernel.

Pods: pa on node1; pb and pc on node2. The client (192.168.56.100) reaches ClusterIPs
through node1, so node1's proxy holds its affinity pins and its connections; `pyproxy
inspect` runs inside node1's namespace, as it would on a node or in the DaemonSet's pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP
from tests.kernel.conftest import Cluster, held_connection

pytestmark = pytest.mark.privileged

AFFINITY_IP = "10.96.0.60"
HOLD_IP = "10.96.0.61"
DNS_IP = "10.96.0.62"


def inspect(cluster: Cluster, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.lab.exec(node, sys.executable, "-m", "pyproxy", "inspect", *args, check=False, timeout=20)


def inspect_json(cluster: Cluster, node: str, kind: str, *args: str) -> dict[str, Any]:
    result = inspect(cluster, node, kind, "-o", "json", *args)
    assert result.returncode == 0, result.stderr
    page: dict[str, Any] = json.loads(result.stdout)
    return page


def pod_ip(cluster: Cluster, line: str) -> str:
    pod = line.split("pod=")[1].split()[0] if "pod=" in line else line.split("From=")[1].split()[0]
    return cluster.lab.pods[pod].ip


def until(what: str, probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    value = probe()
    while not ok(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: last seen {value}")
        time.sleep(0.2)
        value = probe()
    return value


def test_affinity_pins_appear_with_the_pod_that_answered_and_their_age(cluster: Cluster) -> None:
    cluster.apply(
        m.service("sticky", AFFINITY_IP, [m.port(80, 80)], affinity_timeout=30),
        m.endpoint_slice("sticky", cluster.backends("pa", "pb", "pc"), [m.slice_port(80)]),
        name="inspect-sticky.yaml",
    )
    answer = cluster.run("client", "who", f"{AFFINITY_IP}:80")[0]
    served_by = pod_ip(cluster, answer)
    page = inspect_json(cluster, "node1", "affinity", "--service", "default/sticky")
    assert page["total"] == 1 and page["workers"] == 1, page
    pin = page["items"][0]
    assert (pin["client"], pin["endpoint"]) == (CLIENT_IP, f"{served_by}:80"), (answer, pin)
    assert 0 <= pin["age"] < 5 and 25 < pin["expiresIn"] <= 30 and pin["timeoutSeconds"] == 30, pin
    time.sleep(1.5)
    later = inspect_json(cluster, "node1", "affinity", "--service", "sticky")["items"][0]
    assert later["age"] >= pin["age"] + 1 and later["expiresIn"] <= pin["expiresIn"] - 1, (pin, later)
    # the table a user reads, and the filters: another client or namespace lists nothing
    table = inspect(cluster, "node1", "affinity", "--service", "sticky")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["NAMESPACE", "SERVICE", "PORT", "CLIENT", "ENDPOINT", "AGE", "EXPIRES-IN"]
    assert row.split()[:5] == ["default", "sticky", "80/TCP", CLIENT_IP, f"{served_by}:80"], table.stdout
    assert inspect_json(cluster, "node1", "affinity", "--client", "192.168.56.99")["total"] == 0
    assert inspect_json(cluster, "node1", "affinity", "-n", "kube-system")["total"] == 0
    # the service port itself: its frontend, policies, affinity, and endpoints with their sets
    services = inspect_json(cluster, "node1", "services", "--service", "sticky")["items"]
    assert len(services) == 1, services
    svc = services[0]
    assert svc["clusterIPs"] == [AFFINITY_IP] and svc["sessionAffinity"] == "ClientIP", svc
    assert svc["affinityTimeoutSeconds"] == 30 and svc["externalTrafficPolicy"] == "Cluster", svc
    by_address = {e["address"]: e for e in svc["endpoints"]}
    pa = by_address[f"{cluster.lab.pods['pa'].ip}:80"]
    pb = by_address[f"{cluster.lab.pods['pb'].ip}:80"]
    assert (pa["node"], pa["isLocal"], pa["inClusterSet"], pa["inLocalSet"]) == ("node1", True, True, True), pa
    assert (pb["node"], pb["isLocal"], pb["inClusterSet"], pb["inLocalSet"]) == ("node2", False, True, False), pb
    endpoints = inspect(cluster, "node1", "endpoints", "--service", "sticky", "-o", "wide")
    assert endpoints.returncode == 0 and endpoints.stdout.count("ready,serving") == 3, endpoints.stdout


def test_connections_appear_while_open_with_bytes_and_go_after_close(cluster: Cluster) -> None:
    cluster.apply(
        m.service("held", HOLD_IP, [m.port(80, 80)]),
        m.endpoint_slice("held", cluster.backends("pa"), [m.slice_port(80)]),
        name="inspect-held.yaml",
    )

    def mine() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = inspect_json(cluster, "node1", "connections", "--service", "held")["items"]
        return items

    with held_connection(cluster, f"{HOLD_IP}:80") as held:
        assert held.stdin is not None and held.stdout is not None
        greeting = held.stdout.readline()
        assert greeting.startswith("pod=pa"), greeting
        held.stdin.write("x" * 999 + "\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "echo " + "x" * 999
        sent = len("HOLD\n") + 1000
        received = len(greeting) + 1000
        rows = until("the held connection with its bytes", mine,
                     lambda rows: len(rows) == 1 and rows[0]["bytesToClient"] == received)
        row = rows[0]
        assert row["client"].startswith(CLIENT_IP + ":") and row["frontend"] == f"{HOLD_IP}:80", row
        assert row["endpoint"] == f"{cluster.lab.pods['pa'].ip}:80" and row["protocol"] == "TCP", row
        assert (row["bytesToEndpoint"], row["bytesToClient"], row["state"]) == (sent, received, "open"), row
        assert 0 <= row["age"] < 10, row
        table = inspect(cluster, "node1", "connections", "--service", "held", "-o", "wide")
        assert table.returncode == 0 and "open" in table.stdout and f"{HOLD_IP}:80" in table.stdout, table.stdout
        # the endpoint leaves the Service: the connection carries on, and is shown draining
        cluster.apply(
            m.service("held", HOLD_IP, [m.port(80, 80)]),
            m.endpoint_slice("held", cluster.backends("pb"), [m.slice_port(80)]),
            name="inspect-held.yaml",
        )
        assert until("draining", mine, lambda rows: rows and rows[0]["state"] == "draining")
        held.stdin.close()  # the client ends its connection
        assert held.wait(10) == 0
    until("the closed connection to disappear", mine, lambda rows: rows == [])


def test_udp_flows_appear_with_their_datagram_bytes(cluster: Cluster) -> None:
    cluster.apply(
        m.service("dns-like", DNS_IP, [m.port(53, 53, protocol="UDP", name="dns")]),
        m.endpoint_slice("dns-like", cluster.backends("pa"), [m.slice_port(53, protocol="UDP", name="dns")]),
        name="inspect-udp.yaml",
    )
    line = cluster.run("client", "udp", f"{DNS_IP}:53", "--size", "100")[0]
    assert "whole=True" in line, line
    page = inspect_json(cluster, "node1", "connections", "--service", "dns-like")
    assert page["total"] == 1, page
    flow = page["items"][0]
    assert flow["protocol"] == "UDP" and flow["endpoint"] == f"{cluster.lab.pods['pa'].ip}:53", flow
    assert flow["bytesToEndpoint"] == 100 and flow["bytesToClient"] > 100 and flow["state"] == "open", flow


def test_bad_queries_are_refused_with_the_reason(cluster: Cluster) -> None:
    result = inspect(cluster, "node1", "connections", "--limit", "999999")
    assert result.returncode == 1 and "limit: 999999 is above the maximum" in result.stderr, result.stderr
    nothing = inspect(cluster, "node1", "services", "--address", "127.0.0.1:1")
    assert nothing.returncode == 1 and "no answer from http://127.0.0.1:1/debug/services" in nothing.stderr
