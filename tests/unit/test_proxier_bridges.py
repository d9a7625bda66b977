"""The proxier and the pod bridges: which bridges the `netdev pyproxy` chain hooks, and when
the table is rewritten for them (fake nft runner and a fake netlink view; no kernel)."""

from __future__ import annotations

import logging
import random

import pytest

from pyproxy.dataplane.nft import NftConfig, NftError, NftRunner
from pyproxy.model.objects import EndpointSlice, Node, Service, ServiceKey, parse_endpoint_slice, parse_service
from pyproxy.model.source import Source
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable
from pyproxy.proxier import Proxier


class RecordingRunner(NftRunner):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []

    async def apply(self, script: str) -> None:
        if script:  # as NftRunner: an empty script is no transaction
            self.scripts.append(script)


def proxier(bridges: list[list[tuple[str, str]]]) -> tuple[Proxier, RecordingRunner]:
    store = ClusterStore()
    store.services_synced = store.slices_synced = True
    runner = RecordingRunner()
    views = iter(bridges)
    return Proxier(
        store=store, table=ServiceTable("node1", rng=random.Random(1)), nft=runner,
        nft_config=NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001),
        node_addresses=lambda: ["192.168.56.101"], pod_bridges=lambda: next(views),
    ), runner


async def test_a_bridge_that_appears_rewrites_the_table_with_its_hook() -> None:
    cni0 = [("cni0", "10.244.1.0/24")]
    p, runner = proxier([[], [], cni0, cni0])
    await p.sync()  # first sync: full, no bridge yet, so no chain
    await p.sync()  # nothing changed: no write at all
    await p.sync()  # cni0 appeared: full write hooking it
    await p.sync()
    full = [s for s in runner.scripts if s.startswith("table ip pyproxy")]
    assert len(full) == 2 and "chain pod_bridges" not in full[0]
    assert 'devices = { "cni0" }' in full[1]
    assert runner.scripts[-1] == full[1]  # and no rewrite while it stays
    assert p.is_local_source("10.244.1.9") and not p.is_local_source("10.244.2.9")


async def test_a_bridge_that_goes_away_is_unhooked() -> None:
    p, runner = proxier([[("cbr0", "10.244.1.0/24"), ("cni0", "10.88.0.0/16")], [("cni0", "10.88.0.0/16")]])
    await p.sync()
    await p.sync()
    assert 'devices = { "cbr0", "cni0" }' in runner.scripts[0]
    assert 'devices = { "cni0" }' in runner.scripts[1]
    assert not p.is_local_source("10.244.1.9") and p.is_local_source("10.88.3.3")


async def test_reverse_path_routes_follow_the_bridge_subnets_and_are_set_only_on_change() -> None:
    routed: list[list[str]] = []
    p, _ = proxier([[], [("cni0", "10.244.1.0/24")], [("cni0", "10.244.1.0/24")], []])
    p.route_pod_bridges = routed.append
    for _ in range(4):
        await p.sync()
    assert routed == [[], ["10.244.1.0/24"], []]


WEB = ServiceKey("default", "web")
CNI0 = [("cni0", "10.244.1.0/24")]


def web(*ips: str) -> tuple[Service, EndpointSlice]:
    service = parse_service({"metadata": {"name": "web", "namespace": "default"},
                             "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80,
                                                                             "targetPort": 8080}]}})
    endpoints = parse_endpoint_slice({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": "node1"} for ip in ips],
    })
    assert service is not None and endpoints is not None
    return service, endpoints


class TableWatchingRunner(RecordingRunner):
    """Records, with each script, the endpoints the service table held when it was applied."""

    def __init__(self, table: ServiceTable) -> None:
        super().__init__()
        self.table = table
        self.seen: list[set[str]] = []

    async def apply(self, script: str) -> None:
        await super().apply(script)
        self.seen.append({e.ip for state in self.table.ports.values() for e in state.endpoints.cluster})


def steering_proxier(*ips: str, reply_bridges: list[str] | None = None) -> tuple[Proxier, TableWatchingRunner]:
    p, _ = proxier([CNI0] * 10)
    runner = TableWatchingRunner(p.table)
    p.nft = runner
    if reply_bridges is not None:
        held = reply_bridges
        p.reply_bridges = lambda _: held
    p.store.set_node(Node("node1", None, False, False, pod_cidrs=("10.244.1.0/24",)))
    service, endpoints = web(*ips)
    p.store.upsert_service(WEB, service)
    p.store.upsert_slice(endpoints.key, endpoints)
    return p, runner


async def test_a_new_same_bridge_endpoint_is_steered_before_the_relays_can_pick_it() -> None:
    p, runner = steering_proxier("10.244.1.5", "10.244.2.5")
    await p.sync()
    assert "add element bridge pyproxy steer { 10.244.1.5 . tcp . 8080 }" in runner.scripts[0]  # the full write
    assert p.sources.target_source(False, "10.244.1.5") == Source.POD
    _, endpoints = web("10.244.1.5", "10.244.1.6", "10.244.2.5")
    p.store.upsert_slice(endpoints.key, endpoints)
    await p.sync()
    assert runner.scripts[1] == ("add element bridge pyproxy steer { 10.244.1.6 . tcp . 8080 }\n"
                                 "add element bridge pyproxy steer_hosts { 10.244.1.6 }\n")
    assert "10.244.1.6" not in runner.seen[1]  # written while the table did not hold it yet
    assert len(runner.scripts) == 2  # the frontend's element did not change: no other write
    assert "10.244.1.6" in {e.ip for state in p.table.ports.values() for e in state.endpoints.cluster}
    _, endpoints = web("10.244.2.5")
    p.store.upsert_slice(endpoints.key, endpoints)
    await p.sync()
    assert runner.scripts[2:] == [  # gone ones leave with the sync's one write
        "delete element bridge pyproxy steer { 10.244.1.5 . tcp . 8080, 10.244.1.6 . tcp . 8080 }\n"
        "delete element bridge pyproxy steer_hosts { 10.244.1.5, 10.244.1.6 }\n"]


async def test_a_bridge_that_holds_no_reply_mac_falls_back_to_the_node_address(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bridge that filters VLANs (routing.py's reply_bridges leaves it out): said once."""
    p, runner = steering_proxier("10.244.1.5", "10.244.2.5", reply_bridges=[])
    with caplog.at_level(logging.WARNING, logger="pyproxy.proxier"):
        await p.sync()
        await p.sync()
    assert [r.getMessage() for r in caplog.records].count(
        "pod bridges cni0 filter VLANs: endpoints on them see the node's address, not a pod's "
        "(docs/behaviour.md#source-addresses)") == 1
    assert "add element bridge" not in runner.scripts[0]
    assert p.sources.target_source(False, "10.244.1.5") == Source.NODE
    assert p.sources.target_source(False, "10.244.2.5") == Source.POD


async def test_a_failed_write_rewrites_the_steering_in_full() -> None:
    p, runner = steering_proxier("10.244.1.5")
    await p.sync()
    fail = True

    async def failing(script: str) -> None:
        if fail:
            raise NftError("boom")
        await TableWatchingRunner.apply(runner, script)

    p.nft.apply = failing  # type: ignore[method-assign]
    _, endpoints = web("10.244.1.5", "10.244.1.6")
    p.store.upsert_slice(endpoints.key, endpoints)
    with pytest.raises(NftError):
        await p.sync()
    fail = False
    await p.sync()
    assert runner.scripts[-1].startswith("table ip pyproxy")
    assert "add element bridge pyproxy steer { 10.244.1.5 . tcp . 8080, 10.244.1.6 . tcp . 8080 }" in runner.scripts[-1]


async def test_the_node_is_read_again_only_after_a_netlink_change_or_a_new_node() -> None:
    from pyproxy.model.objects import parse_node

    store = ClusterStore()
    store.services_synced = store.slices_synced = True
    reads: list[int] = []
    changes = iter([True, False, False, True, False, False, False])
    p = Proxier(
        store=store, table=ServiceTable("node1", rng=random.Random(1)), nft=RecordingRunner(),
        nft_config=NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001),
        node_addresses=lambda: reads.append(1) or ["192.168.56.101"], node_changes=lambda: next(changes),
    )
    await p.sync()  # the first: read
    await p.sync()
    await p.sync()
    assert len(reads) == 1 and p.addresses == ("192.168.56.101",)
    await p.sync()  # netlink said something changed: read
    assert len(reads) == 2
    store.set_node(parse_node({"metadata": {"name": "node1"}}))
    await p.sync()  # a new Node object (node addresses may read it): read
    await p.sync()
    assert len(reads) == 3


async def test_with_pod_bridges_the_node_is_read_at_every_sync() -> None:
    cni0 = [("cni0", "10.244.1.0/24")]
    p, _ = proxier([cni0, cni0, cni0])
    p.node_changes = lambda: False
    await p.sync()
    await p.sync()
    await p.sync()
    with pytest.raises(StopIteration):  # every view was read
        p.pod_bridges()
