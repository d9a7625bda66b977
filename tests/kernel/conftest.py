"""The real-kernel tier: a client, two nodes running pyproxy, and pods, all in namespaces.

One cluster per test module (building it costs a couple of seconds); tests change the
Services by rewriting the manifest files, exactly as a standalone user would, and wait for
both proxies to log the sync that follows.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import Lab, write_manifest
from tests.conftest import privileged_reason, skip_or_fail

PODS = {"pa": "node1", "pb": "node2", "pc": "node2"}
TCP_PORTS = (80, 8080, 8443)
UDP_PORTS = (53, 5353)


class Cluster:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.proxies: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}

    def manifest_dir(self, node: str) -> Path:
        path = self.workdir / node / "manifests"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_proxy(self, node: str, *extra: str) -> subprocess.Popen[Any]:
        log_path = self.workdir / node / "pyproxy.log"
        self.logs[node] = log_path
        args = [sys.executable, "-m", "pyproxy", "--manifests", str(self.manifest_dir(node)),
                "--hostname-override", node, "--healthz-bind-address", "0.0.0.0:10256", *extra]
        proc = self.lab.spawn(node, args, log=log_path)
        self.proxies[node] = proc
        self.wait_for_log(node, "synced", 0)
        return proc

    def syncs(self, node: str) -> int:
        return self.log(node).count(" synced ")

    def log(self, node: str) -> str:
        return self.logs[node].read_text()

    def wait_for_log(self, node: str, text: str, seen: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(node).count(text) > seen:
                return
            if self.proxies[node].poll() is not None:
                raise AssertionError(f"pyproxy on {node} exited: {self.log(node)[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"pyproxy on {node} did not log {text!r} in {timeout}s: {self.log(node)[-2000:]}")

    def apply(self, *docs: dict[str, Any], name: str = "services.yaml", nodes: Sequence[str] | None = None) -> None:
        """Write the manifest file on every node and wait until each proxy has synced it."""
        nodes = list(nodes or self.proxies)
        before = {n: self.syncs(n) for n in nodes}
        for node in nodes:
            write_manifest(self.manifest_dir(node), name, m.dump(*docs))
        for node in nodes:
            self.wait_for_log(node, " synced ", before[node])

    def run(self, ns: str, mode: str, address: str, *args: str, timeout: float = 60) -> list[str]:
        result = self.lab.exec(ns, sys.executable, "-m", "pyproxy.demo.client", mode, address, *args,
                               timeout=timeout)
        return result.stdout.strip().splitlines()

    def backends(self, *pods: str, **kwargs: Any) -> list[m.Backend]:
        return [m.Backend(self.lab.pods[p].ip, self.lab.pods[p].node, **kwargs) for p in pods]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-test-"))
    lab = Lab()
    try:
        lab.build_lan()
        lab.add_node("node1", 1)
        lab.add_node("node2", 2)
        for pod, node in PODS.items():
            lab.add_pod(pod, node)
            lab.start_echo(pod, tcp=TCP_PORTS, udp=UDP_PORTS, log=workdir / f"{pod}.log")
        lab.route_client("10.96.0.0/16", "node1")
        cluster = Cluster(lab, workdir)
        for node in ("node1", "node2"):
            cluster.start_proxy(node)
        yield cluster
    finally:
        lab.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
