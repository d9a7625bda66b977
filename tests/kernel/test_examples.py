"""examples/ served as they are, on the real kernel: the example files are copied unchanged
into the nodes' manifest directories (their pod addresses are the lab's: pa on node1,
pb and pc on node2, echo servers on 80, 8080 and 8443)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxy.demo.lab import write_manifest
from tests.kernel.conftest import Cluster
from tests.kernel.test_inspect import inspect_json, pod_ip

pytestmark = pytest.mark.privileged

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def serve_example(cluster: Cluster, name: str) -> None:
    for path in sorted((EXAMPLES / name).glob("*.yaml")):
        marks = {node: cluster.log_mark(node) for node in cluster.proxies}
        for node in cluster.proxies:
            write_manifest(cluster.manifest_dir(node), f"example-{path.name}", path.read_text())
        for node in cluster.proxies:
            cluster.wait_for_reload_synced(node, marks[node])


def test_s1_and_s7_examples_serve_as_they_are(cluster: Cluster) -> None:
    serve_example(cluster, "s1-affinity")
    answers = cluster.run("client", "who", "10.96.0.10:8080", "--count", "5")
    assert len({pod_ip(cluster, a) for a in answers}) == 1, answers  # ClientIP: one pod
    pins = inspect_json(cluster, "node1", "affinity", "--service", "sample-session-affinity")["items"]
    assert [p["timeoutSeconds"] for p in pins] == [10], pins
    serve_example(cluster, "s7-multi-port")
    for port, target in ((80, 8080), (443, 8443)):
        answer = cluster.run("client", "who", f"10.96.0.13:{port}")[0]
        assert f"port={target}" in answer, answer  # each service port reaches its own container port
    endpoints = inspect_json(cluster, "node1", "endpoints", "--service", "multi")
    assert endpoints["total"] == 6, endpoints  # three pods, two ports
