"""Fixtures of the realapi tier: the binaries, one control plane per module, clients.

The binaries come from build-binaries.sh (cached outside the repo, a no-op
once built). If they cannot be built the tier skips, except under CI=true,
where it fails (tests.conftest.skip_or_fail).
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from pyproxy.demo.lab import Lab
from tests.conftest import privileged_reason, skip_or_fail
from pyproxy.demo.lab import node_ip, pod_cidr
from tests.realapi.cluster import API_IP, LB_CIDR, NODES, OUTSIDE_IP, PODS, PROXY_ARGS, TCP_PORTS, KubeCluster
from tests.realapi.kube import KubeAPIServer, KubeOptions, build_binaries


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """Directory holding kube-apiserver and etcd (built on first use)."""
    try:
        return build_binaries()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        skip_or_fail(f"cannot build kube-apiserver/etcd with tests/realapi/build-binaries.sh: {exc}")
        raise  # unreachable: skip_or_fail always raises


@pytest.fixture(scope="module")
def kube(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """A running etcd + kube-apiserver shared by the tests of one module."""
    with KubeAPIServer(bin_dir, tmp_path_factory.mktemp("realapi")) as server:
        yield server


@pytest.fixture
def api(kube: KubeAPIServer) -> Iterator[client.ApiClient]:
    """An admin ApiClient for `kube`, closed after the test."""
    with kube.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def cluster(bin_dir: Path, request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """Lab namespaces + a real control plane + pyproxy in cluster mode on node1 and node2.

    A test module may set `KUBE_OPTIONS` (e.g. watch_cache=False); API_IP is always added
    to the serving certificate, since pyproxy reaches the API server there.
    """
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    options = dataclasses.replace(getattr(request.module, "KUBE_OPTIONS", KubeOptions()), extra_ips=(API_IP,))
    workdir = tmp_path_factory.mktemp("realapi-cluster")
    # The lab (pyproxy, forwarder) goes first at teardown: an API server without open
    # watches stops faster.
    with KubeAPIServer(bin_dir, workdir, options) as kube, kube.api_client() as api, Lab() as lab:
        lab.build_lan()
        lab.add_ns("api")
        lab.join_lan("api", API_IP)  # the forwarder listens here, on the LAN
        for index, node in enumerate(NODES, start=1):
            lab.add_node(node, index)
        for pod, node in PODS.items():
            lab.add_pod(pod, node)
            lab.start_echo(pod, tcp=TCP_PORTS)
        lab.add_pod("cl", "node1")  # an in-cluster client
        lab.route_client(options.service_cidr, "node1")
        lab.route_client(LB_CIDR, "node1")
        lab.exec("client", "ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        result = KubeCluster(lab, kube, workdir, api)
        result.start_forwarder()
        for index, node in enumerate(NODES, start=1):
            result.create_node(node, zone=f"zone-{index}", pod_cidr=pod_cidr(index), address=node_ip(index))
        for node in NODES:
            result.start_proxy(node, *PROXY_ARGS.get(node, ()))
        yield result
