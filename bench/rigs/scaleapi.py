"""The scale bench's API writer: Services, EndpointSlices and Nodes through a real API server, fast.

Plain HTTPS (http.client, one keep-alive connection per thread, the admin bearer token), JSON
bodies as kubectl would send them, requests spread over `threads` threads: tens of thousands
of objects go in at the API server's pace, not a client library's. Every request has a
socket timeout; a failure raises (with the API server's answer) instead of being retried.

Object shapes: Service `s<i>` (ClusterIP, port 80 -> 8080, no selector: there is no
controller-manager, the bench writes the slices itself), EndpointSlice `s<i>-1` with
ENDPOINTS_PER_SLICE ready endpoints at addresses that nothing answers on (10.128.0.0/13,
never probed), and the probe Services whose one endpoint is the lab's echo server.
"""

from __future__ import annotations

import functools
import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ENDPOINTS_PER_SLICE = 10
REQUEST_TIMEOUT = 30.0
IDLE_REOPEN = 20.0  # a keep-alive connection idle this long is replaced before use
NAMESPACE = "default"
SERVICES = f"/api/v1/namespaces/{NAMESPACE}/services"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


class ApiError(RuntimeError):
    pass


def filler_ip(k: int) -> str:
    """The k-th address of 10.128.0.0/13 (k < 2**19), skipping .0 and .255 host bytes."""
    k = k + (k // 254) * 2 + 1
    return f"10.{128 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}"


def service_body(name: str, port: int = 80, target: int = 8080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": port, "targetPort": target,
                                                     "protocol": "TCP"}]}}


def slice_body(service: str, addresses: Sequence[str], port: int = 8080) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service}-1", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for a in addresses]}


def filler_addresses(index: int, generation: int = 0) -> list[str]:
    """Slice `index`'s endpoints; a later `generation` moves its first endpoint elsewhere."""
    base = index * ENDPOINTS_PER_SLICE
    addresses = [filler_ip(base + j) for j in range(ENDPOINTS_PER_SLICE)]
    if generation:
        addresses[0] = f"10.136.{(generation >> 8) & 255}.{generation & 255 or 1}"
    return addresses


class Api:
    """The admin's HTTPS client for one API server; thread-safe (a connection per thread)."""

    def __init__(self, host: str, port: int, token: str, ca_file: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.context = ssl.create_default_context(cafile=ca_file)
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self.local, "conn", None)
        now = time.monotonic()
        if conn is not None and now - getattr(self.local, "used", now) > IDLE_REOPEN:
            conn.close()  # the server may have closed it meanwhile: a new one, not a retry
            conn = None
        self.local.used = now
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=REQUEST_TIMEOUT)
            self.local.conn = conn
        return conn

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise
        if resp.status >= 300:
            raise ApiError(f"{method} {path}: {resp.status} {payload[:400]!r}")
        result: dict[str, Any] = json.loads(payload) if payload else {}
        return result

    def create_service(self, name: str, port: int = 80, target: int = 8080) -> str:
        """Create Service `name`; its ClusterIP."""
        created = self.call("POST", SERVICES, service_body(name, port, target))
        return str(created["spec"]["clusterIP"])

    def create_slice(self, service: str, addresses: Sequence[str], port: int = 8080) -> None:
        self.call("POST", SLICES, slice_body(service, addresses, port))

    def move_slice(self, index: int, generation: int) -> None:
        """Change filler slice `index`'s endpoints (a JSON merge patch replaces the list)."""
        patch = {"endpoints": slice_body("x", filler_addresses(index, generation))["endpoints"]}
        self.call("PATCH", f"{SLICES}/s{index}-1", patch, "application/merge-patch+json")

    def create_node(self, name: str, address: str, pod_cidr: str) -> None:
        self.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                                            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}})
        self.call("PATCH", f"/api/v1/nodes/{name}/status",
                  {"status": {"addresses": [{"type": "InternalIP", "address": address},
                                            {"type": "Hostname", "address": name}]}},
                  "application/merge-patch+json")


def run_parallel(tasks: Iterable[Callable[[], object]], threads: int) -> None:
    """Run every task on `threads` threads; the first failure (or a signal's exit) is raised
    at once, the tasks not yet started are dropped."""
    pool = ThreadPoolExecutor(threads)
    try:
        for future in [pool.submit(t) for t in tasks]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def populate(api: Api, first: int, count: int, threads: int = 16) -> float:
    """Create filler Services and slices first..first+count-1; seconds taken."""
    start = time.monotonic()

    def one(i: int) -> None:
        api.create_service(f"s{i}")
        api.create_slice(f"s{i}", filler_addresses(i))

    run_parallel([functools.partial(one, i) for i in range(first, first + count)], threads)
    return time.monotonic() - start
