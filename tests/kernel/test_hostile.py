"""Dead endpoints and clients that misbehave, on the real kernel.

- A Service whose slice lists an endpoint nobody answers on: every connection still
  succeeds (the dial moves on), with affinity too, and the failure is logged and counted.
- A client that sends and never reads: backpressure stalls the whole path, so the proxy
  neither accepts everything nor buffers it (its memory stays flat).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyproxy.demo import manifests as m
from tests.kernel.conftest import Cluster

pytestmark = pytest.mark.privileged

DEAD = "10.244.2.99"  # inside node2's pod CIDR, but no pod has it: node2 answers unreachable
MB = 1 << 20


def pods_of(lines: list[str]) -> list[str]:
    return [re.search(r"pod=(\S+)", line).group(1) if "pod=" in line else line for line in lines]  # type: ignore[union-attr]


def with_dead_endpoint(cluster: Cluster, name: str, ip: str, affinity: int | None) -> None:
    backends = cluster.backends("pa", "pb") + [m.Backend(DEAD, "node2")]
    cluster.apply(
        m.service(name, ip, [m.port(80, 80)], affinity_timeout=affinity),
        m.endpoint_slice(name, backends, [m.slice_port(80)]),
        name=f"{name}.yaml",
    )


def test_dead_endpoint_is_skipped_by_the_dial(cluster: Cluster) -> None:
    failures = cluster.log("node1").count(f"dial {DEAD}:80")
    with_dead_endpoint(cluster, "deadend", "10.96.2.1", affinity=None)
    lines = cluster.run("client", "who", "10.96.2.1:80", "--count", "30", "--timeout", "5")
    assert set(pods_of(lines)) == {"pa", "pb"}, lines
    assert cluster.log("node1").count(f"dial {DEAD}:80") > failures, "the failed dials must be logged"


def test_affinity_never_pins_a_client_to_a_dead_endpoint(cluster: Cluster, tmp_path: Path) -> None:
    with_dead_endpoint(cluster, "deadsticky", "10.96.2.2", affinity=10800)
    lines = cluster.run("client", "who", "10.96.2.2:80", "--count", "20", "--timeout", "5")
    assert len(set(pods_of(lines))) == 1 and pods_of(lines)[0] in ("pa", "pb"), lines


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_a_client_that_never_reads_cannot_grow_the_proxy(cluster: Cluster) -> None:
    cluster.apply(m.service("stall", "10.96.2.3", [m.port(80, 80)]),
                  m.endpoint_slice("stall", cluster.backends("pb"), [m.slice_port(80)]), name="stall.yaml")
    proxy = cluster.serving_pid("node1")
    before = rss_kib(proxy)
    line = cluster.run("client", "stall", "10.96.2.3:80", "--bytes", str(256 * MB), "--timeout", "2")[0]
    sent = int(re.search(r"sent=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert "stalled=True" in line, f"256 MB went out to a pod echoing to a client that never reads: {line}"
    grown = rss_kib(proxy) - before
    assert grown < 16 * 1024, f"the proxy grew by {grown} KiB while {sent} bytes were stuck in the path"
