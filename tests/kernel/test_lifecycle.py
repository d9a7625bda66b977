"""pyproxy's life on the real kernel: start-up errors, SIGTERM with no successor (serving on to
the drain bound), rules left, --cleanup (restarts and hand-overs: test_handover.py).

Each test builds its own small lab (client, one node, one pod), because these tests stop
and start the proxy.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import Lab, write_manifest
from tests.conftest import privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

SVC = "10.96.3.1:80"


class Node:
    def __init__(self, lab: Lab, workdir: Path, relay: tuple[str, ...]) -> None:
        self.lab = lab
        self.workdir = workdir
        self.relay = relay
        self.manifests = workdir / "manifests"
        self.manifests.mkdir()
        self.log_path = workdir / "pyproxy.log"

    def pyproxy(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.lab.exec("node1", sys.executable, "-m", "pyproxy", *args, check=False, timeout=timeout)

    def start(self, *extra: str) -> subprocess.Popen[str]:
        proc = self.lab.spawn("node1", [sys.executable, "-m", "pyproxy", "--manifests", str(self.manifests),
                                        "--hostname-override", "node1", *self.relay,
                                        "--state-dir", str(self.workdir / "state"), *extra],
                              log=self.log_path)
        deadline = time.monotonic() + 20
        while " synced " not in self.log() and time.monotonic() < deadline:
            assert proc.poll() is None, self.log()
            time.sleep(0.05)
        assert " synced " in self.log(), self.log()
        return proc

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


RELAYS = {"engine": ("--relay", "splice"), "twin": ("--relay", "splice", "--pure-python")}


@pytest.fixture(params=list(RELAYS))
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """One node, its pod and a client; pyproxy started on it uses the relay named by the
    parameter (the compiled engine or its pure-Python twin), so the drain and exit paths
    run for both."""
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    lab = Lab()
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-life-"))
    try:
        lab.build_lan()
        lab.add_node("node1", 1)
        pod = lab.add_pod("pa", "node1")
        lab.start_echo("pa", tcp=(80,), log=workdir / "pa.log")
        lab.route_client("10.96.0.0/16", "node1")
        n = Node(lab, workdir, RELAYS[request.param])
        write_manifest(n.manifests, "svc.yaml", m.dump(
            m.service("life", SVC.split(":")[0], [m.port(80, 80)]),
            m.endpoint_slice("life", [m.Backend(pod.ip, "node1")], [m.slice_port(80)]),
        ))
        yield n
    finally:
        lab.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def client(node: Node, mode: str, *args: str) -> str:
    out = node.lab.exec("client", sys.executable, "-m", "pyproxy.demo.client", mode, SVC, *args, timeout=30)
    return out.stdout.strip()


def test_unparsable_manifest_at_start_is_a_clear_error(node: Node) -> None:
    (node.manifests / "bad.yaml").write_text("kind: Service\nmetadata: {name: [oops\n")
    result = node.pyproxy("--manifests", str(node.manifests), "--hostname-override", "node1")
    assert result.returncode != 0
    assert "bad.yaml" in result.stderr and "not valid YAML" in result.stderr, result.stderr
    tables = node.lab.exec("node1", "nft", "list", "tables").stdout
    assert "pyproxy" not in tables, "nothing may be installed when the input is bad"


def test_missing_manifest_dir_and_bad_config_exit_nonzero(node: Node) -> None:
    result = node.pyproxy("--manifests", str(node.workdir / "nope"), "--hostname-override", "node1")
    assert result.returncode != 0 and "nope" in result.stderr
    config = node.workdir / "config.yaml"
    config.write_text("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\ndataplane:\n  mark: 3\n")
    result = node.pyproxy("--config", str(config), "--manifests", str(node.manifests))
    assert result.returncode != 0 and "dataplane.mark" in result.stderr, result.stderr


def test_sigterm_without_a_successor_keeps_serving_until_the_drain_bound(node: Node) -> None:
    """Nobody else serves this node: after SIGTERM the proxy still accepts new connections,
    its open one still echoes, /healthz stays 200, and it leaves at the drain bound."""
    config = node.workdir / "config.yaml"
    config.write_text("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\ndataplane:\n  drainTimeout: 3s\n")
    proxy = node.start("--config", str(config))
    assert client(node, "who").startswith("pod=pa")
    held = subprocess.Popen(
        ["ip", "netns", "exec", node.lab.ns("client"), sys.executable, "-m", "pyproxy.demo.client", "hold", SVC],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert held.stdin is not None and held.stdout is not None
        assert held.stdout.readline().startswith("pod=pa")
        proxy.terminate()
        stopped = time.monotonic()
        deadline = stopped + 10
        while "stopping with no successor" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stopping with no successor: still serving" in node.log(), node.log()[-1500:]
        assert client(node, "connect", "--timeout", "2").split()[0] == "ok", "a stopping proxy alone must serve"
        healthz = node.lab.exec("node1", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                                "http://127.0.0.1:10256/healthz", check=False).stdout
        assert healthz == "200", healthz
        held.stdin.write("during-drain\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "echo during-drain"
        held.stdin.close()  # the client ends its connection; the proxy still serves to the bound
        assert client(node, "who").startswith("pod=pa")
        assert proxy.wait(15) == 0
        assert time.monotonic() - stopped > 2.5, "it left before the drain bound"
        assert held.wait(10) == 0
    finally:
        if held.poll() is None:
            held.kill()
            held.wait(5)
        if held.stdout is not None:
            held.stdout.close()
    assert "0 connections cut" in node.log()
    # rules are left in place on a normal exit, and --cleanup removes them
    tables = node.lab.exec("node1", "nft", "list", "tables").stdout
    assert "table ip pyproxy" in tables and "table ip6 pyproxy" in tables and "table netdev pyproxy" in tables
    assert re.search(r"fwmark 0x200000/0x200000 lookup 2010", node.lab.exec("node1", "ip", "rule").stdout)
    assert re.search(r"fwmark 0x200000/0x200000 lookup 2010", node.lab.exec("node1", "ip", "-6", "rule").stdout)
    assert "local default dev lo" in node.lab.exec("node1", "ip", "-6", "route", "show", "table", "2010").stdout
    assert "pyproxy-in" in node.lab.exec("node1", "ip", "link").stdout  # the bridged pods' re-entry veth
    result = node.pyproxy("--cleanup")
    assert result.returncode == 0, result.stderr
    assert "pyproxy" not in node.lab.exec("node1", "nft", "list", "tables").stdout
    assert "pyproxy-" not in node.lab.exec("node1", "ip", "link").stdout
    assert "lookup 2010" not in node.lab.exec("node1", "ip", "rule").stdout
    assert node.lab.exec("node1", "ip", "route", "show", "table", "2010", check=False).stdout.strip() == ""
    assert "lookup 2010" not in node.lab.exec("node1", "ip", "-6", "rule").stdout
    assert node.lab.exec("node1", "ip", "-6", "route", "show", "table", "2010", check=False).stdout.strip() == ""
    # and --cleanup twice is fine
    assert node.pyproxy("--cleanup").returncode == 0


def test_drain_is_bounded(node: Node) -> None:
    config = node.workdir / "config.yaml"
    config.write_text("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\ndataplane:\n  drainTimeout: 1s\n")
    proxy = node.start("--config", str(config))
    held = subprocess.Popen(
        ["ip", "netns", "exec", node.lab.ns("client"), sys.executable, "-m", "pyproxy.demo.client", "hold", SVC],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert held.stdout is not None and held.stdout.readline().startswith("pod=pa")
        started = time.monotonic()
        proxy.terminate()
        assert proxy.wait(15) == 0
        assert time.monotonic() - started < 5
        assert "1 connections cut at the drain bound" in node.log()
    finally:
        held.kill()
        held.wait(5)
        for stream in (held.stdin, held.stdout):
            if stream is not None:
                stream.close()
