"""The proxier: applies the cluster store to the service table and the kernel, one sync at a time.

Rules kept here:
- Nothing is programmed before the store is synced (first lists complete).
- The first sync, and any sync after a failed kernel write, writes the whole nftables
  table in one transaction; every other sync writes only the changed set elements.
- The relay reads the service table directly, so a new connection sees a change as soon
  as the sync that applied it returns (the kernel write happens first for new frontends,
  last for removed ones, within the same sync).
- A change of node addresses re-applies every Service (NodePort frontends move).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyproxy.dataplane.nft import NftConfig, NftError, NftRunner, render_ruleset, render_update
from pyproxy.model.objects import ServiceKey
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import Element, ServiceTable

log = logging.getLogger("pyproxy.proxier")


@dataclass
class SyncResult:
    changed: int
    added: int
    removed: int
    full: bool
    seconds: float


@dataclass
class Proxier:
    store: ClusterStore
    table: ServiceTable
    nft: NftRunner
    nft_config: NftConfig
    node_addresses: Callable[[], list[str]]
    on_synced: Callable[[SyncResult], None] = lambda _: None
    full_sync_needed: bool = True
    addresses: tuple[str, ...] = ()
    cluster_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    _local: frozenset[str] = field(default_factory=frozenset)

    async def sync(self) -> None:
        if not self.store.synced:
            log.debug("not syncing: waiting for the first complete list of services and endpoint slices")
            return
        started = time.monotonic()
        addresses = tuple(await asyncio.to_thread(self.node_addresses))  # pyroute2 runs its own loop
        changed = self.store.take_changes()
        if addresses != self.addresses:
            log.info("node addresses: %s", ", ".join(addresses) or "none")
            self.addresses = addresses
            self._local = frozenset(addresses)
            changed |= set(self.store.services) | self._tabled()
        try:
            added, removed = self.table.update(changed, self.store, addresses)
            await self._write(added, removed)
            self.table.expire_affinity(time.monotonic())  # the relay's clock: time.monotonic
        except Exception:
            self.full_sync_needed = True
            self.store.mark_all_changed()
            raise
        result = SyncResult(len(changed), len(added), len(removed), self._last_full, time.monotonic() - started)
        self.on_synced(result)

    _last_full: bool = False

    async def _write(self, added: set[Element], removed: set[Element]) -> None:
        self._last_full = self.full_sync_needed
        if not self.full_sync_needed:
            try:
                await self.nft.apply(render_update(added, removed))
                return
            except NftError as err:
                log.warning("incremental nftables update failed, rewriting the table: %s", err)
        await self.nft.apply(render_ruleset(self.nft_config, self.table.all_elements()))
        self.full_sync_needed = False
        self._last_full = True

    def _tabled(self) -> set[ServiceKey]:
        return {name.service for name in self.table.ports}

    def is_local_source(self, ip: str) -> bool:
        """Traffic from the node itself or its cluster's pods (kube-proxy's short-circuit)."""
        if ip in self._local:
            return True
        if self.cluster_cidrs:
            address = ipaddress.IPv4Address(ip)
            return any(address in net for net in self.cluster_cidrs)
        return False


def parse_cidrs(text: str | Iterable[str]) -> tuple[ipaddress.IPv4Network, ...]:
    items = text.split(",") if isinstance(text, str) else text
    return tuple(ipaddress.IPv4Network(c.strip(), strict=False) for c in items if c.strip())
