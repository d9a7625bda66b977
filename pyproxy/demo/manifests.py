"""Service and EndpointSlice documents for the demo and tests, in the API server's shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Backend:
    ip: str
    node: str
    ready: bool = True
    serving: bool | None = None
    terminating: bool | None = None


def service(
    name: str,
    cluster_ip: str,
    ports: Sequence[dict[str, Any]],
    *,
    namespace: str = "default",
    type: str = "ClusterIP",
    affinity_timeout: int | None = None,
    external_policy: str | None = None,
    internal_policy: str | None = None,
    external_ips: Sequence[str] = (),
    lb_ips: Sequence[str] = (),
    health_check_node_port: int | None = None,
    labels: dict[str, str] | None = None,
    cluster_ips: Sequence[str] = (),
) -> dict[str, Any]:
    """A Service; `cluster_ips` (dual-stack: one of each family, the first is `cluster_ip`)
    sets `clusterIPs` and `ipFamilies` as the API server writes them."""
    spec: dict[str, Any] = {"type": type, "clusterIP": cluster_ip, "ports": list(ports)}
    if cluster_ips:
        spec["clusterIPs"] = list(cluster_ips)
        spec["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
        spec["ipFamilyPolicy"] = "RequireDualStack" if len(cluster_ips) > 1 else "SingleStack"
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if external_policy:
        spec["externalTrafficPolicy"] = external_policy
    if internal_policy:
        spec["internalTrafficPolicy"] = internal_policy
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if health_check_node_port:
        spec["healthCheckNodePort"] = health_check_node_port
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }
    if lb_ips:
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return doc


def endpoint_slice(
    service_name: str,
    backends: Sequence[Backend],
    ports: Sequence[dict[str, Any]],
    *,
    name: str | None = None,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    endpoints = []
    for b in backends:
        conditions: dict[str, bool] = {"ready": b.ready}
        if b.serving is not None:
            conditions["serving"] = b.serving
        if b.terminating is not None:
            conditions["terminating"] = b.terminating
        endpoints.append({"addresses": [b.ip], "conditions": conditions, "nodeName": b.node})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-abc12",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": list(ports),
        "endpoints": endpoints,
    }


def port(number: int, target: int | str, name: str = "", protocol: str = "TCP", node_port: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "protocol": protocol, "port": number, "targetPort": target}
    if node_port is not None:
        doc["nodePort"] = node_port
    return doc


def slice_port(number: int, name: str = "", protocol: str = "TCP") -> dict[str, Any]:
    return {"name": name, "protocol": protocol, "port": number}


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
