# mypy: disable-error-code="union-attr,arg-type,no-untyped-call,index"
"""Smoke tests of the realapi tier: a real etcd + kube-apiserver on loopback.

Fixtures (bin_dir, kube, api) live in conftest.py: without buildable binaries
these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.realapi.kube import KubeAPIServer, KubeOptions

pytestmark = pytest.mark.realapi

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
NODE_PORTS = range(30000, 32768)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_node(core: client.CoreV1Api) -> str:
    name = unique("node")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name)))
    return name


def make_lb_service(core: client.CoreV1Api) -> client.V1Service:
    body = client.V1Service(
        metadata=client.V1ObjectMeta(name=unique("lb")),
        spec=client.V1ServiceSpec(
            type="LoadBalancer",
            external_traffic_policy="Local",
            selector={"app": "web"},
            ports=[client.V1ServicePort(name="http", port=80, target_port=8080, protocol="TCP")],
        ),
    )
    created: client.V1Service = core.create_namespaced_service("default", body)
    return created


def make_endpoint_slice(discovery: client.DiscoveryV1Api, service: str,
                        node: str) -> client.V1EndpointSlice:
    body = client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(
            name=unique(service),
            labels={"kubernetes.io/service-name": service},
        ),
        address_type="IPv4",
        endpoints=[client.V1Endpoint(
            addresses=["10.244.1.7"],
            conditions=client.V1EndpointConditions(ready=True, serving=True, terminating=False),
            node_name=node,
        )],
        ports=[client.DiscoveryV1EndpointPort(name="http", port=8080, protocol="TCP")],
    )
    created: client.V1EndpointSlice = discovery.create_namespaced_endpoint_slice("default", body)
    return created


def test_versions(bin_dir: Path, kube: KubeAPIServer) -> None:
    out = subprocess.run([str(bin_dir / "kube-apiserver"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("Kubernetes v1."), out
    status, body = kube.get("/version")
    assert status == 200 and '"gitVersion": "v1.' in body, body
    etcd = subprocess.run([str(bin_dir / "etcd"), "--version"],
                          capture_output=True, text=True, check=True).stdout
    assert "etcd Version: 3." in etcd, etcd


def test_kubeconfig_works(kube: KubeAPIServer) -> None:
    from kubernetes import config

    with config.new_client_from_config(config_file=str(kube.kubeconfig_path)) as api_client:
        namespaces = client.CoreV1Api(api_client).list_namespace()
    assert "default" in {ns.metadata.name for ns in namespaces.items}


def test_loadbalancer_service_allocations(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    make_node(core)
    svc = make_lb_service(core)
    assert ipaddress.ip_address(svc.spec.cluster_ip) in SERVICE_CIDR
    assert svc.spec.cluster_ips == [svc.spec.cluster_ip]
    node_port = svc.spec.ports[0].node_port
    health_port = svc.spec.health_check_node_port
    assert node_port is not None and node_port in NODE_PORTS
    assert health_port is not None and health_port in NODE_PORTS
    assert health_port != node_port


def test_endpointslice_roundtrip(api: client.ApiClient) -> None:
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    node = make_node(core)
    svc = make_lb_service(core)
    created = make_endpoint_slice(discovery, svc.metadata.name, node)
    got = discovery.read_namespaced_endpoint_slice(created.metadata.name, "default")
    assert got.address_type == "IPv4"
    assert got.endpoints[0].addresses == ["10.244.1.7"]
    assert got.endpoints[0].node_name == node
    assert got.endpoints[0].conditions.ready is True
    assert got.ports[0].port == 8080
    listed = discovery.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={svc.metadata.name}")
    assert [s.metadata.name for s in listed.items] == [created.metadata.name]


def test_objects_survive_apiserver_restart(kube: KubeAPIServer) -> None:
    with kube.api_client() as api_client:
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        node = make_node(core)
        svc = make_lb_service(core)
        eps = make_endpoint_slice(discovery, svc.metadata.name, node)
    old_pid = kube.apiserver.pid if kube.apiserver else None
    kube.restart_apiserver()
    assert kube.apiserver is not None and kube.apiserver.pid != old_pid
    with kube.api_client() as api_client:
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        assert core.read_node(node).metadata.name == node
        got = core.read_namespaced_service(svc.metadata.name, "default")
        assert got.spec.cluster_ip == svc.spec.cluster_ip
        assert got.spec.health_check_node_port == svc.spec.health_check_node_port
        assert discovery.read_namespaced_endpoint_slice(
            eps.metadata.name, "default").metadata.uid == eps.metadata.uid


def watch_from(core: client.CoreV1Api, resource_version: str) -> int:
    """Watch services from `resource_version`: 0 once an event arrives, else the error code."""
    stream = watch.Watch()
    try:
        for event in stream.stream(core.list_namespaced_service, "default",
                                   resource_version=resource_version,
                                   timeout_seconds=10, _request_timeout=20):
            obj: Any = event["object"]
            if event["type"] == "ERROR":
                code = obj.get("code") if isinstance(obj, dict) else getattr(obj, "code", 0)
                return int(code or 0)
            return 0
    except ApiException as exc:
        return int(exc.status)
    finally:
        stream.stop()
    pytest.fail(f"watch from resourceVersion {resource_version} saw no event")


def old_rv_then_changes(api_client: client.ApiClient) -> str:
    """A services resourceVersion, followed by a few newer writes."""
    core = client.CoreV1Api(api_client)
    old_rv = core.list_namespaced_service("default").metadata.resource_version
    assert old_rv
    for _ in range(3):
        make_lb_service(core)
    return old_rv


def test_watch_gone_after_etcd_compaction(bin_dir: Path, tmp_path: Path) -> None:
    # Without the watch cache every watch is served by etcd, so the 410 is
    # the compaction's doing (the shared server's cache would hide it).
    options = KubeOptions(watch_cache=False)
    with KubeAPIServer(bin_dir, tmp_path, options) as server, server.api_client() as api:
        old_rv = old_rv_then_changes(api)
        core = client.CoreV1Api(api)
        assert watch_from(core, old_rv) == 0
        assert server.compact_etcd() > int(old_rv)
        assert watch_from(core, old_rv) == 410
        # The usual recovery: relist, then watch from the new resourceVersion.
        fresh_rv = old_rv_then_changes(api)
        assert watch_from(core, fresh_rv) == 0


def test_watch_gone_after_apiserver_restart(kube: KubeAPIServer) -> None:
    # With the (default) watch cache, a restarted apiserver rebuilds the cache
    # at etcd's current revision: older resourceVersions come back 410 Gone.
    with kube.api_client() as api:
        old_rv = old_rv_then_changes(api)
        assert watch_from(client.CoreV1Api(api), old_rv) == 0
    kube.restart_apiserver()
    with kube.api_client() as api:
        assert watch_from(client.CoreV1Api(api), old_rv) == 410
