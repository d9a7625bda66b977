"""daemonset.yaml: valid against the Kubernetes schemas (offline, strict), and the properties
a kube-proxy replacement needs, checked by reading the YAML."""

from __future__ import annotations

import re

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyproxy.config import load_config
from tests.conftest import skip_or_fail

MANIFEST = Path(__file__).resolve().parents[2] / "daemonset.yaml"
KUBERNETES_VERSION = "1.31.0"  # kind's node images of that era; kubernetes-validate ships its schemas


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = docs["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def test_strictly_valid_offline() -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        skip_or_fail("needs kubernetes-validate (pip install kubernetes-validate, in the test extras)")
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(MANIFEST)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_objects(docs: dict[str, dict[str, Any]]) -> None:
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"}
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert docs[kind]["metadata"]["namespace"] == "kube-system"
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": docs["ClusterRole"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pyproxy", "namespace": "kube-system"}]


def test_rbac_is_least_privilege(docs: dict[str, dict[str, Any]]) -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in docs["ClusterRole"]["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("", "services"): {"list", "watch"},
        ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
    }


def test_runs_on_every_node_as_node_critical(docs: dict[str, dict[str, Any]], pod: dict[str, Any]) -> None:
    assert docs["DaemonSet"]["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # the successor starts beside the running pod and takes over from it: never a node without one
    assert docs["DaemonSet"]["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    for container in pod["containers"]:  # a hostPort would keep the surge pod off the node
        assert not container.get("ports"), "with hostNetwork, container ports become host ports"
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["dnsPolicy"] == "Default"  # cluster DNS is a Service this proxy programs


def test_container(pod: dict[str, Any], docs: dict[str, dict[str, Any]]) -> None:
    (container,) = pod["containers"]
    args = container["command"]
    assert args[0] == "pyproxy"
    assert "--hostname-override=$(NODE_NAME)" in args
    assert "--master=$(PYPROXY_MASTER)" in args
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["PYPROXY_MASTER"] == {"configMapKeyRef": {"name": "pyproxy", "key": "apiServer"}}
    assert docs["ConfigMap"]["data"]["apiServer"].startswith("https://")
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security.get("privileged", False)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/lib/modules"]["readOnly"] is True


def test_the_config_map_holds_a_valid_config(pod: dict[str, Any], docs: dict[str, dict[str, Any]]) -> None:
    config = load_config(docs["ConfigMap"]["data"]["config.yaml"], "ConfigMap pyproxy")
    assert config.healthzBindAddress == "0.0.0.0:10256"
    assert config.metricsBindAddress == "127.0.0.1:10249"
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_flag = next(a for a in container["command"] if a.startswith("--config="))
    assert config_flag == f"--config={mounts['config']}/config.yaml"
    assert pod["terminationGracePeriodSeconds"] > config.dataplane.drainTimeout
    # the old and the new pod meet on the hand-over socket in one host directory
    assert config.lifecycle.afterHandOver == "wait"  # an exited container would be restarted
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"] == {"path": config.lifecycle.stateDir, "type": "DirectoryOrCreate"}
    assert mounts["state"] == config.lifecycle.stateDir


def test_dockerfile_base_is_the_public_slim_python_pinned_and_replaceable() -> None:
    """The image itself is built and run by the kind tier; this pins the recipe's shape."""
    text = (MANIFEST.parent / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for needed in ("nftables", "iproute2", "pip install", "--no-index --find-links /src/wheels"):
        assert needed in text
    ignore = (MANIFEST.parent / ".dockerignore").read_text().split()
    # everything the console scripts import (pyproxy, bench) is in the context; tests are not
    assert ignore[ignore.index("*") + 1:].count("!pyproxy/") == 1 and "!bench/" in ignore
    assert "!tests/" not in ignore


def test_the_command_line_is_one_pyproxy_accepts(pod: dict[str, Any], docs: dict[str, dict[str, Any]],
                                                 tmp_path: Path) -> None:
    from pyproxy.cli import build_parser, effective_config

    (container,) = pod["containers"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    values = {"$(NODE_NAME)": "kind-worker", "$(PYPROXY_MASTER)": docs["ConfigMap"]["data"]["apiServer"]}
    args = []
    for arg in container["command"][1:]:
        for var, value in values.items():
            arg = arg.replace(var, value)
        args.append(arg.replace("/etc/pyproxy/config.yaml", str(config_file)))
    config = effective_config(build_parser().parse_args(args))
    assert config.hostnameOverride == "kind-worker"
    assert config.clientConnection.apiServer == "https://kind-control-plane:6443"
    assert not config.manifests  # cluster mode
