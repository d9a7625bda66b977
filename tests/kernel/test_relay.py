"""The relay on the real kernel: bytes intact, half-close, draining, bad manifests, and open
connections moving to a successor pyproxy.

Same cluster as test_scenarios.py (pa on node1; pb, pc on node2; the LAN client routes the
service CIDR to node1). The restarts come last: node1's pyproxy is another process after them.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP, write_manifest
from tests.kernel.conftest import Cluster, held_connection
from tests.kernel.moving import (
    HALF_CLOSED, STREAM, TCP_SVC, UDP_FLOW, UDP_SVC, Clients, clients, line_of, restart, tell,
)

__all__ = ["clients"]  # a fixture

pytestmark = pytest.mark.privileged

ALL = ("pa", "pb", "pc")
MB = 1 << 20


def plain_service(cluster: Cluster, name: str, ip: str, pods: tuple[str, ...] = ALL, **kwargs: object) -> None:
    cluster.apply(
        m.service(name, ip, [m.port(80, 80, node_port=kwargs.pop("node_port", None))],  # type: ignore[arg-type]
                  **kwargs),  # type: ignore[arg-type]
        m.endpoint_slice(name, cluster.backends(*pods), [m.slice_port(80)]),
        name=f"{name}.yaml",
    )


BYTE_PATHS = {"splice": "splice, compiled engine", "pure-asyncio": "splice, pure Python"}


def test_each_variant_runs_the_byte_path_it_names(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    """The default variant runs the compiled engine (so a missing build fails here, not
    silently slower), the other its pure-Python twin: both proxies say so when they start."""
    wanted = BYTE_PATHS[request.node.callspec.params["cluster"]]
    for node in ("node1", "node2"):
        assert f"(TCP relay: {wanted})" in cluster.log(node), cluster.log(node)[-2000:]


def test_100_mb_each_way_arrive_intact(cluster: Cluster) -> None:
    plain_service(cluster, "bulk", "10.96.1.1")
    # ECHO: 100 MB up while 100 MB come back, then our EOF travels to the pod and its EOF back
    line = cluster.run("client", "echo", "10.96.1.1:80", "--bytes", str(100 * MB), "--timeout", "60", timeout=120)[0]
    assert line == f"sent={100 * MB} received={100 * MB} match=True", line


def test_bulk_through_a_transparent_upstream(cluster: Cluster) -> None:
    """Local policy: the upstream socket is transparent (bound to the client's IP)."""
    plain_service(cluster, "bulklocal", "10.96.1.2", pods=("pa",), type="NodePort", node_port=30201,
                  external_policy="Local")
    line = cluster.run("client", "echo", "192.168.56.101:30201", "--bytes", str(20 * MB), "--timeout", "60")[0]
    assert line == f"sent={20 * MB} received={20 * MB} match=True", line
    who = cluster.run("client", "who", "192.168.56.101:30201")[0]
    assert f"client={CLIENT_IP}" in who


def test_half_close_is_forwarded(cluster: Cluster) -> None:
    """SINK: the pod answers only after it sees our EOF, so the answer proves EOF crossed alone."""
    plain_service(cluster, "half", "10.96.1.3")
    line = cluster.run("client", "sink", "10.96.1.3:80", "--bytes", str(5 * MB))[0]
    assert re.fullmatch(rf"sent={5 * MB} match=True reply={5 * MB} [0-9a-f]{{64}}", line), line


def test_bursts_in_turns_arrive_whole(cluster: Cluster) -> None:
    """Request/response with big messages and no EOF: each 1 MiB turn is all sent before its
    echo is read. The last bytes of a burst bring no new readiness of their own (the engine's
    sockets are edge-triggered), so a read that stopped at its round limit, or at a switch
    between copying and splicing, must look again by itself: else the turn stalls."""
    plain_service(cluster, "turns", "10.96.1.9")
    line = cluster.run("client", "turns", "10.96.1.9:80", "--bytes", str(MB), "--count", "30", "--timeout", "10",
                       timeout=120)[0]
    assert line == "turns=30/30", line


@pytest.mark.parametrize("size", [4, MB])
def test_urgent_data_costs_no_other_byte_and_ends_cleanly(cluster: Cluster, size: int) -> None:
    """The cases measured through `pyproxy --manifests` (issue 23): N bytes, one urgent byte
    (MSG_OOB), N bytes, FIN, to the echo pod. Before the fix only the first part came back,
    then a reset. The relays pass the urgent byte in band (docs/behaviour.md), so the pod
    echoes it too; tests/kernel/test_urgent.py covers each copy mode and both directions."""
    plain_service(cluster, "urgent", "10.96.1.12")
    line = cluster.run("client", "urgent", "10.96.1.12:80", "--bytes", str(size), "--timeout", "10", timeout=60)[0]
    assert line == f"received={2 * size + 1} whole=True urgent=inband end=eof", line


@pytest.fixture
def held(cluster: Cluster) -> Iterator[subprocess.Popen[str]]:
    """A client connection kept open (HOLD), that echoes each line we send through it."""
    with held_connection(cluster, "10.96.1.4:80") as proc:
        yield proc


def send_line(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_removed_endpoint_drains_while_new_connections_go_elsewhere(
    cluster: Cluster, held: subprocess.Popen[str]
) -> None:
    plain_service(cluster, "drain", "10.96.1.4")
    assert held.stdout is not None
    pinned = re.search(r"pod=(\S+)", held.stdout.readline()).group(1)  # type: ignore[union-attr]
    remaining = tuple(p for p in ALL if p != pinned)
    plain_service(cluster, "drain", "10.96.1.4", pods=remaining)
    fresh = cluster.run("client", "who", "10.96.1.4:80", "--count", "20")
    assert pinned not in " ".join(fresh), f"new connections still reach the removed pod {pinned}: {fresh}"
    # the connection opened before the removal carries on, in both directions
    assert send_line(held, "still-here") == "echo still-here"
    assert send_line(held, "and-again") == "echo and-again"


def test_invalid_object_is_skipped_and_others_keep_serving(cluster: Cluster) -> None:
    plain_service(cluster, "good", "10.96.1.5")
    bad = m.service("broken", "10.96.1.6", [m.port(80, 80)])
    bad["spec"]["sessionAffinity"] = "Sometimes"
    write_manifest(cluster.manifest_dir("node1"), "broken.yaml", m.dump(bad))
    cluster.wait_for_log("node1", "broken.yaml[0]", 0)
    log = cluster.log("node1")
    assert re.search(r"broken\.yaml\[0\].*Service default/broken.*spec\.sessionAffinity", log), log[-1500:]
    assert len(cluster.run("client", "who", "10.96.1.5:80", "--count", "3")) == 3
    (cluster.manifest_dir("node1") / "broken.yaml").unlink()


def test_unparsable_file_at_reload_keeps_the_last_good_state(cluster: Cluster) -> None:
    plain_service(cluster, "steady", "10.96.1.7")
    directory = cluster.manifest_dir("node1")
    refused = cluster.log("node1").count("reload refused")
    # one edit that adds a Service and breaks the file: refused whole
    text = m.dump(m.service("steady", "10.96.1.7", [m.port(80, 80)]),
                  m.service("newcomer", "10.96.1.8", [m.port(80, 80)]))
    write_manifest(directory, "steady.yaml", text + "\n  - this: [is not yaml\n")
    cluster.wait_for_log("node1", "reload refused", refused)
    assert "steady.yaml" in cluster.log("node1").split("reload refused")[-1].splitlines()[0]
    assert len(cluster.run("client", "who", "10.96.1.7:80", "--count", "3")) == 3, "last good state must serve"
    assert cluster.run("client", "connect", "10.96.1.8:80", "--timeout", "1")[0].split()[0] != "ok"
    # fixed: applied at the next reload
    mark = cluster.log_mark("node1")
    write_manifest(directory, "steady.yaml", m.dump(
        m.service("steady", "10.96.1.7", [m.port(80, 80)]),
        m.endpoint_slice("steady", cluster.backends("pa"), [m.slice_port(80)]),
    ))
    cluster.wait_for_reload_synced("node1", mark)
    deadline = time.monotonic() + 5
    pods: set[str] = set()
    while time.monotonic() < deadline and pods != {"pa"}:
        pods = {re.search(r"pod=(\S+)", line).group(1)  # type: ignore[union-attr]
                for line in cluster.run("client", "who", "10.96.1.7:80", "--count", "6")}
    assert pods == {"pa"}


def test_open_connections_cross_two_restarts_intact(cluster: Cluster, clients: Clients) -> None:
    """Two long streams, a UDP flow and (from the second restart on) a half-closed
    connection move to the successor twice; none drains in the old process or is cut."""
    cluster.apply(
        m.service("move", TCP_SVC, [m.port(80, 80)]),
        m.endpoint_slice("move", cluster.backends("pa", "pb", "pc"), [m.slice_port(80)]),
        m.service("moveudp", UDP_SVC, [m.port(53, 53, protocol="UDP")],
                  affinity_timeout=600),  # a datagram past the 0.25 s hold keeps its pod too
        m.endpoint_slice("moveudp", cluster.backends("pa", "pb", "pc"), [m.slice_port(53, protocol="UDP")]),
        name="move.yaml",
    )
    streams = [clients.start(STREAM) for _ in range(2)]
    udp = clients.start(UDP_FLOW)
    for stream in streams:
        line_of(stream, "flowing", 20)
    line_of(udp, "answered", 20)
    [first] = restart(cluster)
    half = clients.start(HALF_CLOSED)
    line_of(half, "shut", 10)
    time.sleep(0.5)
    [second] = restart(cluster)
    time.sleep(0.5)
    assert first == "handing over 2 TCP connections and 1 UDP flows; 0 connections drain here"
    assert second == "handing over 3 TCP connections and 1 UDP flows; 0 connections drain here"
    tell([*streams, udp], "stop")
    for stream in streams:  # more than 16 MB each way; all of it came back, in order
        assert line_of(stream, "stream", 40) == "stream True True True"
    assert line_of(half, "answer", 15) == "answer True"
    assert line_of(udp, "udp", 15) == "udp True 1", "every answer, from the service address, from one pod"
