"""The real-kernel tier: a client, two nodes running pyproxy, and pods, all in namespaces.

One cluster per test module (building it costs a couple of seconds); tests change the
Services by rewriting the manifest files, exactly as a standalone user would, and wait for
both proxies to log the sync that follows (pyproxy.demo.cluster). Each module runs twice: the
default splice relay on its compiled engine on uvloop, and its pure-Python twin on plain
asyncio.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyproxy.demo.cluster import PODS, TCP_PORTS, UDP_PORTS, Cluster, build
from pyproxy.demo.lab import Lab
from tests.conftest import privileged_reason, skip_or_fail

__all__ = ["PODS", "TCP_PORTS", "UDP_PORTS", "Cluster", "bridged_cluster", "cluster"]


VARIANTS = {  # pyproxy's command-line for each run of the kernel tier
    "splice": ("--event-loop", "uvloop", "--relay", "splice"),  # the default: the compiled engine
    # the same relay's pure-Python twin (what runs where no compiler built the engine), on the other loop
    "pure-asyncio": ("--event-loop", "asyncio", "--relay", "splice", "--pure-python"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The cluster, with pyproxy in the variant named by the parameter: every test that uses
    it runs with the compiled engine on uvloop (the default) and the pure-Python twin on asyncio."""
    yield from _cluster(VARIANTS[request.param])


@pytest.fixture(scope="module", params=list(VARIANTS))
def bridged_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The same cluster, but both nodes hang their pods off a Linux bridge (`cni0`) with
    `net.bridge.bridge-nf-call-iptables=1` set in the node (the bridge CNI plugin's shape)."""
    yield from _cluster(VARIANTS[request.param], bridged=("node1", "node2"))


def _cluster(proxy_args: tuple[str, ...], bridged: tuple[str, ...] = (),
             client_addresses: tuple[str, ...] = ()) -> Iterator[Cluster]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-test-"))
    lab = Lab()
    try:
        cluster = build(lab, workdir, proxy_args=proxy_args, bridged=bridged)
        for ip in client_addresses:  # extra source addresses on the LAN client
            lab.exec("client", "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        yield cluster
    finally:
        lab.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


@contextmanager
def held_connection(cluster: Cluster, address: str) -> Iterator[subprocess.Popen[str]]:
    """A client connection kept open (HOLD) that echoes each line sent through it."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", cluster.lab.ns("client"), sys.executable, "-m", "pyproxy.demo.client",
         "hold", address, "--timeout", "10"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
