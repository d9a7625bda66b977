"""The proxier and the pod bridges: which bridges the `netdev pyproxy` chain hooks, and when
the table is rewritten for them (fake nft runner and a fake netlink view; no kernel)."""

from __future__ import annotations

import random

from pyproxy.dataplane.nft import NftConfig, NftRunner
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
