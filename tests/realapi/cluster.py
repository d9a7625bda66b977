# mypy: disable-error-code="union-attr,arg-type,index"
"""A lab cluster driven through a real kube-apiserver: pyproxy in cluster mode on two nodes.

Shape: `pyproxy.demo.lab.Lab` (client, node1, node2 on a LAN bridge; pods pa on node1, pb
and pc on node2, plus an in-cluster client pod `cl` on node1), and a real etcd +
kube-apiserver (tests/realapi/kube.py) on the root namespace's loopback. The node
namespaces cannot reach that loopback, so a forwarder (tests/realapi/forward.py) listens
in a lab namespace `api` joined to the LAN at API_IP and dials the API server from the root
namespace. pyproxy gets the admin kubeconfig (whose server is 127.0.0.1:PORT, unreachable
from the node) and `--master https://API_IP:6443`: the explicit-master path, which must not
depend on the `kubernetes` ClusterIP that pyproxy programs itself.

Tests change Services and EndpointSlices with the kubernetes client and then wait for
every pyproxy to log the sync that follows. There is no controller-manager: tests write
EndpointSlices themselves, as the EndpointSlice controller would.
"""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client

from pyproxy.demo.lab import Lab
from tests.realapi.kube import KubeAPIServer

REPO = Path(__file__).resolve().parents[2]
FORWARDER = Path(__file__).resolve().parent / "forward.py"
API_IP = "192.168.56.2"
API_PORT = 6443
PODS = {"pa": "node1", "pb": "node2", "pc": "node2"}
ALL = tuple(PODS)
NODES = ("node1", "node2")
TCP_PORTS = (80, 8080, 8443)
SYNC_TIMEOUT = 60.0  # covers a reconnect backoff after an API server restart
LB_CIDR = "10.97.0.0/24"  # load-balancer IPs tests put in Service status; the client routes them to node1
OUTSIDE_IP = "192.168.56.150"  # a second address of the LAN client: a host outside source ranges
# node1 reads its Node object for local detection and NodePort addresses; node2 keeps the defaults
PROXY_ARGS = {"node1": ("--detect-local-mode", "NodeCIDR", "--nodeport-addresses", "primary")}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def pods_of(lines: Iterable[str]) -> list[str]:
    return [re.search(r"(?:From=|pod=)(\S+)", line).group(1) for line in lines]


def client_ips_of(lines: Iterable[str]) -> list[str]:
    return [re.search(r"(?:ClientIP=|client=)(\S+)", line).group(1) for line in lines]


# API-shaped bodies (camelCase, as kubectl would send them)


def service_body(name: str, ports: Sequence[dict[str, Any]], *, type: str = "ClusterIP",
                 affinity_timeout: int | None = None, external_policy: str | None = None,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": type, "selector": {"app": name}, "ports": list(ports)}
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_policy:
        spec["externalTrafficPolicy"] = external_policy
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": dict(labels or {})}, "spec": spec}


def port(port: int, target: int | str, name: str = "", node_port: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"port": port, "targetPort": target, "protocol": "TCP"}
    if name:
        body["name"] = name
    if node_port:
        body["nodePort"] = node_port
    return body


class KubeCluster:
    def __init__(self, lab: Lab, kube: KubeAPIServer, workdir: Path, api: client.ApiClient) -> None:
        self.lab = lab
        self.kube = kube
        self.workdir = workdir
        self.api = api
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.proxies: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}

    # processes

    def start_forwarder(self) -> None:
        log_path = self.workdir / "forwarder.log"
        with open(log_path, "a") as log:
            proc = subprocess.Popen(
                [sys.executable, str(FORWARDER), "--netns", f"/run/netns/{self.lab.ns('api')}",
                 "--listen", f"{API_IP}:{API_PORT}", "--to", f"127.0.0.1:{self.kube.port}"],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.lab.processes.append(proc)  # Lab.close() ends it by PID
        assert proc.stdout is not None
        with proc.stdout:  # it prints 'ready' once, then nothing
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"forwarder did not start: {line}{log_path.read_text()}")

    def start_proxy(self, node: str, *extra: str) -> None:
        log_path = self.workdir / f"pyproxy-{node}.log"
        self.logs[node] = log_path
        args = [sys.executable, "-m", "pyproxy", "--kubeconfig", str(self.kube.kubeconfig_path),
                "--master", f"https://{API_IP}:{API_PORT}", "--hostname-override", node,
                "--healthz-bind-address", "0.0.0.0:10256", *extra]
        self.proxies[node] = self.lab.spawn(node, args, log=log_path)
        self.wait_for_log(node, " synced ", 0)

    # logs and syncs

    def log(self, node: str) -> str:
        return self.logs[node].read_text()

    def syncs(self, node: str) -> int:
        return self.log(node).count(" synced ")

    def wait_for_log(self, node: str, text: str, seen: int, timeout: float = SYNC_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(node).count(text) > seen:
                return
            if self.proxies[node].poll() is not None:
                raise AssertionError(f"pyproxy on {node} exited: {self.log(node)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"pyproxy on {node} did not log {text!r} in {timeout}s: {self.log(node)[-3000:]}")

    def change(self, action: Callable[[], Any], quiet: float = 0.5, nodes: Sequence[str] | None = None) -> Any:
        """Run an API change, then wait until each pyproxy (of `nodes`) has synced after it and settled.

        One change can arrive as several watch events (a Service, then its EndpointSlice,
        on different watches) and so as several syncs: after the first, wait until no
        further sync has come for `quiet` seconds.
        """
        before = {n: self.syncs(n) for n in (nodes or self.proxies)}
        result = action()
        for node, seen in before.items():
            self.wait_for_log(node, " synced ", seen)
        deadline = time.monotonic() + SYNC_TIMEOUT
        counts = {n: self.syncs(n) for n in before}
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = {n: self.syncs(n) for n in before}
            if now == counts:
                return result
            counts = now
        raise AssertionError(f"pyproxy kept syncing for {SYNC_TIMEOUT}s after a change")

    # API objects

    def create_service(self, body: dict[str, Any]) -> client.V1Service:
        created: client.V1Service = self.core.create_namespaced_service("default", client.V1Service.from_dict(body))
        return created

    def patch_service(self, name: str, patch: dict[str, Any]) -> None:
        self.core.patch_namespaced_service(name, "default", patch)

    def slice_body(self, name: str, service: str, pods: Sequence[str], ports: Sequence[dict[str, Any]], *,
                   conditions: dict[str, dict[str, bool]] | None = None,
                   labels: dict[str, str] | None = None) -> dict[str, Any]:
        endpoints = []
        for pod in pods:
            endpoints.append({
                "addresses": [self.lab.pods[pod].ip],
                "conditions": (conditions or {}).get(pod, {"ready": True, "serving": True, "terminating": False}),
                "nodeName": self.lab.pods[pod].node,
                "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
            })
        return {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service, **(labels or {})}},
            "endpoints": endpoints, "ports": list(ports),
        }

    def put_slice(self, body: dict[str, Any]) -> None:
        """Create the EndpointSlice, or replace it when it exists (as the controller does)."""
        name = body["metadata"]["name"]
        model = client.V1EndpointSlice.from_dict(body)
        try:
            current = self.discovery.read_namespaced_endpoint_slice(name, "default")
        except client.exceptions.ApiException as err:
            if err.status != 404:
                raise
            self.discovery.create_namespaced_endpoint_slice("default", model)
            return
        model.metadata.resource_version = current.metadata.resource_version
        self.discovery.replace_namespaced_endpoint_slice(name, "default", model)

    def create_node(self, name: str, zone: str, pod_cidr: str, address: str) -> None:
        """A Node as a kubelet and the node IPAM controller leave it: zone label, pod CIDR, and
        its address in status (which only the status subresource sets)."""
        self.core.create_node(client.V1Node.from_dict(
            {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
             "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}}))
        self.core.patch_node_status(name, {"status": {"addresses": [
            {"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]}})

    # traffic

    def run(self, ns: str, mode: str, address: str, *args: str, timeout: float = 60) -> list[str]:
        result = self.lab.exec(ns, sys.executable, "-m", "pyproxy.demo.client", mode, address, *args,
                               timeout=timeout)
        return result.stdout.strip().splitlines()

    def eventually(self, probe: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe():
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} not reached in {timeout}s")
