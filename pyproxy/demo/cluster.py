"""A two-node pyproxy cluster in namespaces, driven the way a standalone user drives it.

Shared by the demo and the real-kernel tests. Rules kept here:
- The cluster is a `Lab` (client, node1, node2, echo pods on routed veths or, on the nodes
  named in `bridged`, on a Linux bridge) with pyproxy
  running standalone on each node from a manifest directory of its own.
- Services change only by rewriting manifest files atomically, exactly as a user would;
  `apply` returns once every proxy has logged the sync that follows.
- Every wait is bounded; a proxy that exits while awaited is an error with its log tail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import SERVICE_CIDR6, Lab, write_manifest

PODS = {"pa": "node1", "pb": "node2", "pc": "node2"}
TCP_PORTS = (80, 8080, 8443)
UDP_PORTS = (53, 5353)
SERVICE_CIDR = "10.96.0.0/16"


class Cluster:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.proxies: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}
        self.syncers: dict[str, int] = {}  # processes per node that log each sync (--workers N: N)

    def manifest_dir(self, node: str) -> Path:
        path = self.workdir / node / "manifests"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_proxy(self, node: str, *extra: str, wrap: Sequence[str] = ()) -> subprocess.Popen[Any]:
        """Start pyproxy on `node`; `wrap` runs it through a command that execs it (prlimit)."""
        log_path = self.workdir / node / "pyproxy.log"
        self.manifest_dir(node)
        self.logs[node] = log_path
        args = [*wrap, sys.executable, "-m", "pyproxy", "--manifests", str(self.manifest_dir(node)),
                "--hostname-override", node, "--healthz-bind-address", "0.0.0.0:10256",
                "--state-dir", str(self.workdir / node / "state"), *extra]
        proc = self.lab.spawn(node, args, log=log_path)
        self.proxies[node] = proc
        self.syncers[node] = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        self.wait_for_log(node, "synced", self.syncers[node] - 1)  # every worker has its table
        return proc

    def serving_pid(self, node: str, slot: int = 0) -> int:
        """The pid of the process serving `slot` on `node` (pyproxy's supervisor, the process
        started, names it in `<stateDir>/supervisor.json`); its fds and memory are the proxy's."""
        path = self.workdir / node / "state" / "supervisor.json"
        deadline = time.monotonic() + 10
        while True:
            try:
                entry = json.loads(path.read_text())["slots"][str(slot)]
                if entry.get("state") == "serving" and entry.get("pid"):
                    return int(entry["pid"])
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no serving process for slot {slot} on {node} in {path}")
            time.sleep(0.05)

    def syncs(self, node: str) -> int:
        return self.log(node).count(" synced ")

    def log(self, node: str) -> str:
        path = self.logs[node]
        return path.read_text() if path.exists() else ""

    def wait_for_log(self, node: str, text: str, seen: int, timeout: float = 15) -> None:
        """Wait until `text` appears in the node's log more than `seen` times."""
        self._wait_for(node, lambda log: log.count(text) > seen, f"log {text!r}", timeout)

    def _wait_for(self, node: str, done: Callable[[str], bool], what: str, timeout: float) -> None:
        """Poll the node's log until `done(log)` (bounded); fail at once if its pyproxy exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.log(node)):
                return
            if self.proxies[node].poll() is not None:
                raise AssertionError(f"pyproxy on {node} exited: {self.log(node)[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"pyproxy on {node} did not {what} in {timeout}s: {self.log(node)[-2000:]}")

    def apply(self, *docs: dict[str, Any], name: str = "services.yaml", nodes: Sequence[str] | None = None) -> None:
        """Write the manifest file on every node and wait until each proxy has synced it.

        A node whose file already holds exactly this text is left alone: rewriting it would
        change nothing, so no sync would come to wait for."""
        text = m.dump(*docs)
        nodes = [n for n in (nodes or self.proxies) if _read(self.manifest_dir(n) / name) != text]
        marks = {n: self.log_mark(n) for n in nodes}
        for node in nodes:
            write_manifest(self.manifest_dir(node), name, text)
        for node in nodes:
            self.wait_for_reload_synced(node, marks[node])

    def log_mark(self, node: str) -> int:
        """Where the node's log ends now: `wait_for_reload_synced` reads what comes after."""
        return len(self.log(node))

    def wait_for_reload_synced(self, node: str, mark: int, timeout: float = 15) -> None:
        """Wait until, after `mark`, every process of the node (--workers N: N) has reloaded
        the manifests and logged a sync after that reload. Any sync will not do: a fresh
        process syncs again about a second after its first, and that sync, counted before the
        files were read, once let a test send its first datagram to a Service not yet there."""
        want = self.syncers.get(node, 1)
        self._wait_for(node, lambda log: _reloads_synced(log[mark:]) >= want, "reload and sync", timeout)

    def run(self, ns: str, mode: str, address: str, *args: str, timeout: float = 60) -> list[str]:
        """Run the demo client in namespace `ns`; one line per result."""
        result = self.lab.exec(ns, sys.executable, "-m", "pyproxy.demo.client", mode, address, *args,
                               timeout=timeout)
        return result.stdout.strip().splitlines()

    def backends(self, *pods: str, ipv6: bool = False, **kwargs: Any) -> list[m.Backend]:
        """The pods as endpoints, by their IPv4 address (or, with `ipv6`, their IPv6 one)."""
        return [m.Backend(self.lab.pods[p].ip6 if ipv6 else self.lab.pods[p].ip, self.lab.pods[p].node, **kwargs)
                for p in pods]


def _reloads_synced(text: str) -> int:
    """How many syncs in `text` each follow a manifest reload of their own."""
    pending = done = 0
    for line in text.splitlines():
        if "manifests reloaded" in line:
            pending += 1
        elif " synced " in line and pending:
            pending -= 1
            done += 1
    return done


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def build(lab: Lab, workdir: Path, pods: Mapping[str, str] = PODS, proxy_args: Sequence[str] = (),
          bridged: Sequence[str] = ()) -> Cluster:
    """Client, node1 and node2 with pyproxy running, and echo pods; the client routes the
    service CIDR to node1. The nodes named in `bridged` hang their pods off a Linux bridge."""
    lab.build_lan()
    lab.add_node("node1", 1, bridge="node1" in bridged)
    lab.add_node("node2", 2, bridge="node2" in bridged)
    for pod, node in pods.items():
        lab.add_pod(pod, node)
        lab.start_echo(pod, tcp=TCP_PORTS, udp=UDP_PORTS, log=workdir / f"{pod}.log")
    lab.route_client(SERVICE_CIDR, "node1")
    lab.route_client(SERVICE_CIDR6, "node1")
    cluster = Cluster(lab, workdir)
    for node in ("node1", "node2"):
        cluster.start_proxy(node, *proxy_args)
    return cluster
