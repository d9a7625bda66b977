"""The proxier: applies the cluster store to the service table and the kernel, one sync at a time.

Rules kept here:
- Nothing is programmed before the store is synced (first lists complete).
- The first sync, and any sync after a failed kernel write, writes the whole nftables
  table in one transaction; every other sync writes only the changed set elements.
- The relay reads the service table directly, so a new connection sees a change as soon
  as the sync that applied it returns (the kernel write happens first for new frontends,
  last for removed ones, within the same sync).
- A change of node addresses re-applies every Service (NodePort frontends move).
- The node (its addresses, the pod bridges, routes) is read by netlink at a sync when the
  kernel reported a change of links, addresses or routes since the last read, when the Node
  object changed, and at every sync while pod bridges exist (netlinkwatch.py; the first sync
  always reads). The pod bridges are the configured names that exist with an IPv4 address;
  when they change, the next write is a full one, whose `netdev pyproxy` chain hooks
  exactly those (older kernels refuse a hook on a device that does not exist).
- Local sources (kube-proxy's short-circuit: cluster set, node's address) are the node's
  addresses, this node's pods as `--detect-local-mode` finds them (model/localdetect.py:
  the cluster CIDRs, the Node's podCIDRs, or the routes through the pods' interfaces, read
  at every sync), and the subnets of the pod bridges on this node (their pods are this
  node's whatever the mode finds). The kernel's `local_sources` set holds the same
  networks; when they change, the next write is a full one.
- On a node with pod bridges, the replies of endpoints on them are steered up to the node
  (dataplane/replies.py; model/source.py's `bridged_endpoints`, kept per Service and
  recomputed for the Services a sync changes, or all when the bridges or the node's
  addresses change). New steered endpoints are written before the service table changes,
  so no relay keeps a pod's address towards an endpoint whose replies still pass it by;
  gone ones go with the sync's own write. Each bridge's reply MAC is held at every sync;
  a bridge that cannot hold one (routing.py's `reply_bridges`) is not steered.
- With a setting that reads the Node (`NodeCIDR`, `--nodeport-addresses primary`), nothing
  is programmed until the Node has been looked up once, so the first rules already use it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pyproxy.dataplane.nft import NftConfig, NftError, NftRunner, render_ruleset, render_update
from pyproxy.dataplane.replies import update_lines
from pyproxy.heap import building, settle, trim
from pyproxy.model.localdetect import NODE_CIDR, LocalDetection, Network, pod_networks
from pyproxy.model.objects import ServiceKey
from pyproxy.model.source import SourcePolicy, Steer, bridged_endpoints, source_policy
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import Element, ServiceTable

log = logging.getLogger("pyproxy.proxier")


NodeRead = tuple[tuple[str, ...], list[tuple[str, str]], list[str], list[tuple[str, str]]]  # see _read_node


@dataclass
class SyncResult:
    changed: int
    added: int
    removed: int
    full: bool
    seconds: float
    cpu_seconds: float = 0.0  # the process's CPU time meanwhile (all its threads: the watches are idle then, mostly)


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
    detection: LocalDetection = field(default_factory=LocalDetection)
    needs_node: bool = False  # a setting reads the Node: wait for its first lookup
    interface_routes: Callable[[], list[tuple[str, str]]] = list  # (interface, destination) routes (netlink)
    pod_bridges: Callable[[], list[tuple[str, str]]] = list  # (bridge, subnet) on this node (netlink)
    route_pod_bridges: Callable[[list[str]], None] = lambda _: None  # their reverse-path routes (netlink)
    reply_bridges: Callable[[list[str]], list[str]] = list  # those that hold the reply MAC (netlink; replies.py)
    _routed: list[str] | None = None
    _local: frozenset[str] = field(default_factory=frozenset)
    _bridged: tuple[Network, ...] = ()
    _pods: tuple[Network, ...] = ()
    _steered_subnets: tuple[Network, ...] = ()  # the bridged subnets whose endpoints' replies are steered
    _unsteered: tuple[str, ...] = ()  # pod bridges that cannot be (logged when that changes)
    _steer_by_service: dict[ServiceKey, frozenset[Steer]] = field(default_factory=dict)
    _steer_inputs: tuple[object, ...] = ()  # the bridges and addresses `_steer_by_service` was computed for
    _steered_written: frozenset[Steer] | None = None  # what the `bridge pyproxy` sets hold; None: no table
    _warned_no_pod_cidrs: bool = False
    node_changes: Callable[[], bool] = lambda: True  # netlink reported a change (dataplane/netlinkwatch.py)
    _node_read: NodeRead | None = None
    _node_read_for: object = None  # the Node object `_node_read` was made with (node addresses read it)
    sources: SourcePolicy = field(default_factory=SourcePolicy)  # whose address endpoints see (model/source.py)

    async def sync(self) -> None:
        if not self.store.synced:
            log.debug("not syncing: waiting for the first complete list of services and endpoint slices")
            return
        if self.needs_node and not self.store.node_listed:
            log.debug("not syncing: waiting for the first lookup of this node's Node object")
            return
        started, cpu_started = time.monotonic(), time.process_time()
        addresses, bridges, held, routes = await self._node_state()
        self._use_pod_bridges(bridges, held)
        self._use_local_sources(routes)
        changed = self.store.take_changes()
        if addresses != self.addresses:
            log.info("node addresses: %s", ", ".join(addresses) or "none")
            self.addresses = addresses
            self._local = frozenset(addresses)
            changed |= set(self.store.services) | self._tabled()
        steered = self._steering(changed)
        await self._steer_first(steered)
        if self._use_source_policy():
            changed |= set(self.store.services) | self._tabled()  # new routes: the relays plan again
        try:
            if self.full_sync_needed:  # the whole table is built anew: no collection walks it meanwhile
                with building():
                    added, removed = self.table.update(changed, self.store, addresses)
            else:
                added, removed = self.table.update(changed, self.store, addresses)
            await self._write(added, removed, steered)
            self.table.expire_affinity(time.monotonic())  # the relay's clock: time.monotonic
        except Exception:
            self.full_sync_needed = True
            self.store.mark_all_changed()
            self._steered_written = None
            raise
        result = SyncResult(len(changed), len(added), len(removed), self._last_full, time.monotonic() - started,
                            time.process_time() - cpu_started)
        self.on_synced(result)

    _last_full: bool = False

    async def _node_state(self) -> NodeRead:
        """The node's addresses, pod bridges and routes: read again only when netlink reported a
        change since the last read, the Node object changed, or pod bridges exist (whose reply
        MAC is held at every sync)."""
        changed = self.node_changes()  # drained at every sync
        node = self.store.node
        cached = self._node_read
        if cached is not None and not changed and node is self._node_read_for and not cached[1]:
            return cached
        self._node_read = await asyncio.to_thread(self._read_node)  # pyroute2 runs its own loop
        self._node_read_for = node
        return self._node_read

    def _read_node(self) -> NodeRead:
        """Netlink, in a thread: the node's addresses, pod bridges (and which of them hold the
        reply MAC) and (for the interface modes of local detection) routes; bridge routes kept
        current."""
        addresses, bridges = tuple(self.node_addresses()), self.pod_bridges()
        routes = self.interface_routes() if self.detection.reads_interfaces else []
        subnets = sorted({cidr for _, cidr in bridges})
        if subnets != self._routed:
            self.route_pod_bridges(subnets)
            self._routed = subnets
        held = self.reply_bridges(sorted({name for name, _ in bridges}))
        return addresses, bridges, held, routes

    def _steering(self, changed: set[ServiceKey]) -> frozenset[Steer]:
        """The endpoints on pod bridges whose replies the kernel must steer (model/source.py)."""
        inputs = (self._steered_subnets, self.addresses)
        if inputs != self._steer_inputs:
            self._steer_inputs, self._steer_by_service = inputs, {}
            changed = changed | set(self.store.services) | {s.service for s in self.store.slices.values()}
        if self._steered_subnets:
            for key in changed:
                found = bridged_endpoints(self.store.slices_of(key), self._steered_subnets, self._local)
                if found:
                    self._steer_by_service[key] = found
                else:
                    self._steer_by_service.pop(key, None)
        return frozenset().union(*self._steer_by_service.values())

    async def _steer_first(self, steered: frozenset[Steer]) -> None:
        """New steered endpoints into the kernel's table before the relays can pick them."""
        written = self._steered_written
        if written is None or self.full_sync_needed or not self.nft_config.pod_bridges or steered <= written:
            return  # a full write follows (or nothing to add)
        try:
            await self.nft.apply("\n".join(update_lines(written, written | steered)) + "\n")
            self._steered_written = written | steered
        except NftError as err:
            log.warning("adding steered endpoints failed, rewriting the table: %s", err)
            self.full_sync_needed = True

    def _use_local_sources(self, routes: list[tuple[str, str]]) -> None:
        """This node's pods as the detection mode finds them, into the relay's view and the
        kernel's `local_sources` (a change rewrites the table)."""
        node = self.store.node
        if self.detection.mode == NODE_CIDR and not (node and node.pod_cidrs) and not self._warned_no_pod_cidrs:
            log.warning("detect-local-mode NodeCIDR: Node %s has no spec.podCIDRs yet; only the node itself "
                        "counts as local until it has", node.name if node else "(not found)")
            self._warned_no_pod_cidrs = True
        pods = pod_networks(self.detection, node, routes)
        sources = tuple(str(n) for n in sorted(set(pods) | set(self._bridged), key=lambda n: (n.version, n)))
        if pods != self._pods:
            log.info("local pods (detect-local-mode %s): %s", self.detection.mode,
                     ", ".join(map(str, pods)) or "none detected")
            self._pods = pods
        if sources != self.nft_config.local_sources:
            self.nft_config = replace(self.nft_config, local_sources=sources)
            self.full_sync_needed = True

    def _use_source_policy(self) -> bool:
        """This node's own pods (its Node's podCIDRs; its pod bridges for the fallback) for the
        relays' choice of source address; True when that changed."""
        node = self.store.node
        policy = source_policy(self.addresses, node.pod_cidrs if node else (), self._bridged,
                               steered=self._steered_subnets)
        if policy == self.sources:
            return False
        log.info("pods of this node keep their address to Service endpoints: %s",
                 ", ".join(map(str, policy.pods)) or "none known (the Node has no podCIDRs yet)")
        self.sources = policy
        return True

    def _use_pod_bridges(self, bridges: list[tuple[str, str]], held: list[str]) -> None:
        names = tuple(sorted({name for name, _ in bridges}))
        subnets = tuple(sorted({cidr for _, cidr in bridges}))
        if names != self.nft_config.pod_bridges or subnets != self.nft_config.bridge_subnets:
            log.info("pod bridges: %s", ", ".join(f"{n} {c}" for n, c in bridges) or "none")
            self.nft_config = replace(self.nft_config, pod_bridges=names, bridge_subnets=subnets)
            self.full_sync_needed = True  # the chain's hook devices change with the table
        self._bridged = parse_cidrs(cidr for _, cidr in bridges)
        self._steered_subnets = parse_cidrs(cidr for name, cidr in bridges if name in held)
        unsteered = tuple(sorted(set(names) - set(held)))
        if unsteered != self._unsteered and unsteered:  # routing.py's reply_bridges: they filter VLANs
            log.warning("pod bridges %s filter VLANs: endpoints on them see the node's address, not a "
                        "pod's (docs/behaviour.md#source-addresses)", ", ".join(unsteered))
        self._unsteered = unsteered

    async def _write(self, added: set[Element], removed: set[Element], steered: frozenset[Steer]) -> None:
        self._last_full = self.full_sync_needed
        if not self.full_sync_needed and (self._steered_written is not None or not self.nft_config.pod_bridges):
            before = self._steered_written or frozenset()
            try:
                await self.nft.apply(render_update(added, removed, *self.table.allow_changes, before, steered))
                if self._steered_written is not None:
                    self._steered_written = steered
                return
            except NftError as err:
                log.warning("incremental nftables update failed, rewriting the table: %s", err)
        await self.nft.apply(render_ruleset(self.nft_config, self.table.all_elements(), self.table.all_allows(),
                                            steered))
        self._steered_written = steered if self.nft_config.pod_bridges else None
        self.full_sync_needed = False
        self._last_full = True
        settle()  # the whole table was just built and stays: later collections skip it (heap.py)
        trim()  # and what building it (and the lists before it) freed goes back to the kernel

    def _tabled(self) -> set[ServiceKey]:
        return {name.service for name in self.table.ports}

    def is_local_source(self, ip: str) -> bool:
        """Traffic from the node itself or its cluster's pods (kube-proxy's short-circuit)."""
        return is_local_source(ip, self._local, self._pods + self._bridged)


def is_local_source(ip: str, node_addresses: frozenset[str], networks: Iterable[Network]) -> bool:
    """The node's own address, or one inside this node's pod networks or a pod bridge's subnet."""
    if ip in node_addresses:
        return True
    address = ipaddress.ip_address(ip)
    return any(address in net for net in networks if net.version == address.version)


def parse_cidrs(text: str | Iterable[str]) -> tuple[Network, ...]:
    items = text.split(",") if isinstance(text, str) else text
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in items if c.strip())
