"""The debug API and /metrics of a proxy run with `--workers 2`, on the real kernel.

Each worker keeps its own affinity table, connections and counters; clients are steered to
a worker by their source address. The client namespace gets several extra addresses, so
that both workers of node1's proxy serve some of them, and the test checks that node1's
metrics address shows every worker's pins and connections, and sums every worker's counters.
Last, node1's proxy is restarted: each worker hands its open connections to its
counterpart in the successor group (tests/kernel/moving.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.cluster import Cluster
from tests.kernel.conftest import _cluster, held_connection
from tests.kernel.moving import UDP_FLOW, Clients, line_of, restart, stream_code, tell
from tests.kernel.test_inspect import inspect, inspect_json, pod_ip, until

pytestmark = pytest.mark.privileged

SVC_IP = "10.96.0.70"
SOURCES = [f"192.168.56.{n}" for n in range(150, 166)]  # 16 client addresses: both workers get some


@pytest.fixture(scope="module")
def workers_cluster() -> Iterator[Cluster]:
    yield from _cluster(("--workers", "2", "--relay", "splice"), client_addresses=tuple(SOURCES))


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def scrape(cluster: Cluster) -> str:
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:10249/metrics', timeout=5).read().decode())"
    return cluster.lab.exec("node1", sys.executable, "-c", code, timeout=20).stdout


def test_every_workers_pins_connections_and_counters_appear(workers_cluster: Cluster) -> None:
    cluster = workers_cluster
    cluster.apply(
        m.service("sticky", SVC_IP, [m.port(80, 80)], affinity_timeout=600),
        m.endpoint_slice("sticky", cluster.backends("pa", "pb", "pc"), [m.slice_port(80)]),
        name="workers.yaml",
    )
    served: dict[str, str] = {}
    for ip in SOURCES:
        line = cluster.run("client", "who", f"{SVC_IP}:80", "--bind", ip, "--count", "2")
        assert len({pod_ip(cluster, one) for one in line}) == 1, line  # sticky within a worker
        served[ip] = pod_ip(cluster, line[0])
    page = inspect_json(cluster, "node1", "affinity", "--service", "sticky")
    assert page["workers"] == 2 and "errors" not in page, page
    pins = {item["client"]: item for item in page["items"]}
    assert set(pins) == set(SOURCES), page
    assert all(pins[ip]["endpoint"] == f"{served[ip]}:80" for ip in SOURCES), (served, pins)
    assert {item["worker"] for item in page["items"]} == {0, 1}, page
    # paging over both workers: two pages of 10 and 6 make the whole sorted list
    first = inspect_json(cluster, "node1", "affinity", "--service", "sticky", "--limit", "10")
    second = inspect_json(cluster, "node1", "affinity", "--service", "sticky", "--limit", "10", "--offset", "10")
    assert first["next"] == 10 and second["next"] is None, (first, second)
    def pins_of(items: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [(i["client"], i["endpoint"], i["worker"]) for i in items]

    assert pins_of(first["items"] + second["items"]) == pins_of(page["items"])
    # an open connection appears, whichever worker holds it
    with held_connection(cluster, f"{SVC_IP}:80") as held:
        assert held.stdout is not None and held.stdout.readline().startswith("pod=")
        conns = until("the held connection", lambda: inspect_json(cluster, "node1", "connections"),
                      lambda p: p["total"] == 1)
        assert conns["workers"] == 2 and conns["items"][0]["state"] == "open", conns
        wide = inspect(cluster, "node1", "connections", "-o", "wide")
        assert wide.returncode == 0 and "WORKER" in wide.stdout.splitlines()[0], wide.stdout
    # /metrics sums every worker's counters: 2 connections per source address, and the held one
    text = scrape(cluster)
    assert metric_total(text, "pyproxy_connections_total", service="sticky") == 2 * len(SOURCES) + 1, text
    assert metric_total(text, "pyproxy_affinity_entries", service="sticky") == len(SOURCES) + 1, text
    assert metric_total(text, "pyproxy_affinity_hits_total", service="sticky") == len(SOURCES), text
    assert text.count("# TYPE pyproxy_connections_total counter") == 1, text
    assert metric_total(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == 0  # no labels: plain line
    assert "\nkubeproxy_sync_proxy_rules_last_timestamp_seconds " in text


ASK_WORKER = """
import os, sys
from pyproxy.observe.inspect_api import fetch_unix, worker_socket_name
if sys.argv[2] == "nobody":
    os.setgid(65534)
    os.setuid(65534)
try:
    status, body = fetch_unix(worker_socket_name(int(sys.argv[1]), 1), "/debug/affinity", 3.0)
    print(status)
except OSError as err:
    print("no answer", type(err).__name__)
"""


def test_a_workers_socket_answers_only_its_own_user(workers_cluster: Cluster) -> None:
    supervisor = workers_cluster.proxies["node1"].pid  # `ip netns exec` execs pyproxy in place

    def ask(user: str) -> str:
        return workers_cluster.lab.exec("node1", sys.executable, "-c", ASK_WORKER, str(supervisor), user,
                                        timeout=20).stdout.strip()

    assert ask("root") == "200"
    assert ask("nobody").startswith("no answer"), "another user must not read a worker's view"


@pytest.fixture
def worker_clients(workers_cluster: Cluster) -> Iterator[Clients]:
    made = Clients(workers_cluster)
    try:
        yield made
    finally:
        made.close()


def test_each_worker_hands_its_connections_to_its_successor(workers_cluster: Cluster,
                                                           worker_clients: Clients) -> None:
    cluster = workers_cluster
    cluster.apply(
        m.service("moving", "10.96.5.1", [m.port(80, 80)]),
        m.endpoint_slice("moving", cluster.backends("pa", "pb", "pc"), [m.slice_port(80)]),
        m.service("movingudp", "10.96.5.2", [m.port(53, 53, protocol="UDP")],
                  affinity_timeout=600),  # a datagram past the 0.25 s hold keeps its pod too
        m.endpoint_slice("movingudp", cluster.backends("pa", "pb", "pc"), [m.slice_port(53, protocol="UDP")]),
        name="moving.yaml",
    )
    streams = [worker_clients.start(stream_code("10.96.5.1", 80, source)) for source in SOURCES[:6]]
    udp = worker_clients.start(UDP_FLOW)
    try:
        for stream in streams:
            line_of(stream, "flowing", 20)
        line_of(udp, "answered", 20)
    except AssertionError as err:  # say what the workers said too
        raise AssertionError(f"{err}\nnode1's log:\n{cluster.log('node1')[-4000:]}") from None
    lines = restart(cluster, workers=2)
    counts = sorted(int(line.split()[2]) for line in lines)
    assert sum(counts) == 6 and counts[0] > 0, f"both workers had streams to hand over: {lines}"
    assert all(line.endswith("; 0 connections drain here") for line in lines), lines
    assert sum(" 1 UDP flows" in line for line in lines) == 1, "worker 0 serves UDP"
    time.sleep(1)
    tell([*streams, udp], "stop")
    for stream in streams:
        assert line_of(stream, "stream", 40) == "stream True True True"
    assert line_of(udp, "udp", 15) == "udp True 1"
