"""Assembles a running proxy from a config: source -> store -> sync runner -> kernel + relay.

Start-up order keeps the kernel untouched until the input is known good: load (and
validate) the input first, then install policy routing, start the listener, and only then
program nftables with the first sync. Shutdown stops accepting, drains open connections
up to `drainTimeout`, and leaves the rules in place (`--cleanup` removes them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pyproxy.config import ProxyConfig
from pyproxy.dataplane.dualstack import DualStackRelay
from pyproxy.dataplane.errors import ErrorLog
from pyproxy.dataplane.nft import NftConfig, NftRunner
from pyproxy.dataplane.relay import Relay, RelayConfig
from pyproxy.dataplane.splice import FastRelay, TcpRelay
from pyproxy.dataplane.workers import NullNftRunner, WorkerRole
from pyproxy.dataplane.routing import PolicyRouting, interface_routes, local_addresses, pod_bridges
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpConfig, UdpRelay
from pyproxy.inspect.reader import ProxyReader
from pyproxy.model.family import join_host_port, node_port_candidate
from pyproxy.model.objects import ServiceKey
from pyproxy.observe.metrics import CountingStore
from pyproxy.observe.observer import Observer
from pyproxy.model.table import Frontend, ServiceTable
from pyproxy.model import nodeports
from pyproxy.model.localdetect import LocalDetection
from pyproxy.proxier import Proxier, SyncResult, parse_cidrs
from pyproxy.sources.kube import KubeSource
from pyproxy.sources.kube_client import SourceError, open_transport
from pyproxy.sources.manifests import ManifestSnapshot, fingerprint, load_manifests, watch_manifests
from pyproxy.supervisor import Job, Supervisor
from pyproxy.sync import SyncRunner

log = logging.getLogger("pyproxy")


class StartupError(RuntimeError):
    pass


def node_name_of(config: ProxyConfig) -> str:
    return config.hostnameOverride or socket.gethostname()


def policy_routing(config: ProxyConfig) -> PolicyRouting:
    dp = config.dataplane
    return PolicyRouting(mark=dp.mark, table=dp.routeTable, priority=dp.rulePriority,
                         reentry_mark=dp.reentryMark)


class ProxyApp:
    def __init__(self, config: ProxyConfig, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker or WorkerRole()  # one of dataplane.workers; only worker 0 programs the kernel
        self.node_name = node_name_of(config)
        dp = config.dataplane
        self.store = CountingStore()  # a ClusterStore that also counts changes for the metrics
        self.stats = DataplaneStats()
        self.table = ServiceTable(
            self.node_name,
            capacity=dp.affinityCapacity,
            consistent_seed=dp.consistentAffinitySeed or None,
            rng=random.Random(),
            on_conflict=_log_conflict,
        )
        self.proxier = Proxier(
            store=self.store,
            table=self.table,
            nft=NftRunner() if self.worker.programs_kernel else NullNftRunner(),
            nft_config=NftConfig(
                mark=dp.mark,
                tcp_port=dp.tcpProxyPort,
                udp_port=dp.udpProxyPort,
                reentry_mark=dp.reentryMark,
            ),
            node_addresses=self._node_port_addresses,
            on_synced=self._synced,
            detection=local_detection(config),
            needs_node=config.detectLocalMode == "NodeCIDR" or nodeports.PRIMARY in config.nodePortAddresses,
            interface_routes=interface_routes,
            pod_bridges=lambda: pod_bridges(dp.podBridges),
            route_pod_bridges=(policy_routing(config).route_pod_bridges if self.worker.programs_kernel
                               else lambda _: None),
        )
        self.runner = SyncRunner(self.proxier.sync, config.minSyncPeriod, config.syncPeriod)
        relay_config = RelayConfig(
            dial_timeouts=dp.dialTimeouts,
            idle_timeout=dp.tcpIdleTimeout,
            half_close_timeout=dp.tcpHalfCloseTimeout,
        )

        def make_relay() -> TcpRelay:  # one per address family (dualstack.py)
            if dp.relay == "splice":  # the raw-fd + os.splice byte path (pyproxy/dataplane/splice.py)
                return FastRelay(self.table, self.proxier.is_local_source, self.stats, relay_config,
                                 splice_after=dp.spliceAfter)
            return Relay(table=self.table, is_local_source=self.proxier.is_local_source, stats=self.stats,
                         config=relay_config)

        self.relay: TcpRelay = DualStackRelay(make_relay, serve_ipv6=self.worker.programs_kernel)
        self.udp = UdpRelay(
            table=self.table,
            is_local_source=self.proxier.is_local_source,
            stats=self.stats,
            config=UdpConfig(idle_timeout=dp.udpIdleTimeout, max_flows=dp.maxUDPFlows),
        )
        self.stop = asyncio.Event()
        self.supervisor = Supervisor(self.stop)  # every long-lived task runs under it
        reader = ProxyReader(self.store, self.table, lambda: itertools.chain(self.relay.connections(),
                                                                             self.udp.connections()),
                             shutting_down=self.stop.is_set, worker=self.worker.index)
        self.observer = Observer(config, self.store, self.table, self.stats, self.runner, reader, self.worker,
                                 down=lambda: self.supervisor.down)
        self.force = False

    def _node_port_addresses(self) -> list[str]:
        """The local addresses that serve NodePorts (netlink; `primary` reads the Node)."""
        node = self.store.node
        candidates = [a for a in local_addresses() if node_port_candidate(a)]  # never link-local or ::1
        return nodeports.select(candidates, self.config.nodePortAddresses, node.host_ips if node else ())

    def _synced(self, result: SyncResult) -> None:
        self.observer.synced(result.seconds)  # sync metrics; health check endpoint counts
        self.udp.on_sync()  # flows to endpoints that just left are dropped
        log.info(
            "synced %d services (%s write: +%d -%d elements) in %.1f ms",
            result.changed, "full" if result.full else "incremental", result.added, result.removed,
            result.seconds * 1000,
        )

    def apply_manifests(self, snapshot: ManifestSnapshot) -> None:
        for problem in snapshot.problems:
            log.error("skipping invalid object: %s", problem)
        for problem in snapshot.parts:
            log.warning("skipping part of an object: %s", problem)
        self.store.replace_all(snapshot.services, snapshot.slices)
        self.store.set_node(snapshot.node)
        if self.store.has_changes:
            self.runner.request()

    async def _load_source(self) -> tuple[str, Callable[[Job], Coroutine[Any, Any, None]]]:
        """Standalone: load the manifests now. Cluster: connect; the watch task fills the store."""
        if not self.config.manifests:
            client = self.config.clientConnection
            try:
                transport = await asyncio.to_thread(open_transport, client.kubeconfig, client.apiServer)
            except SourceError as err:
                raise StartupError(f"{err} (give --manifests DIR, --kubeconfig or --master)") from None
            kube = KubeSource(self.store, self.runner.request, transport, self.node_name, self.config.proxyName or None)

            async def follow_kube(job: Job) -> None:
                job.probe = lambda: bool(kube.broken)  # a watch thread failing unexpectedly
                job.activity = "watching the API server"
                job.up()
                await kube.run()

            return "kube-source", follow_kube  # no sync programs anything before both first lists (store.synced)
        manifests = Path(self.config.manifests)
        limits, proxy_name = self.config.manifestLimits, self.config.proxyName or None
        first_fingerprint = await asyncio.to_thread(fingerprint, manifests)  # never read files on the loop
        self.apply_manifests(await asyncio.to_thread(load_manifests, manifests, self.node_name, proxy_name, limits))

        async def follow_manifests(job: Job) -> None:
            def deliver(snapshot: ManifestSnapshot) -> None:
                self.apply_manifests(snapshot)
                job.up()

            def activity(text: str) -> None:
                job.activity = text

            last = first_fingerprint if job.restarts == 0 else None  # after a failure: reload at once
            await watch_manifests(manifests, self.node_name, proxy_name, deliver, self.config.manifestPollInterval,
                                  self.stop, last, limits, activity)

        return "manifest-watch", follow_manifests

    async def run(self) -> int:
        self._install_loop_errors()
        source_name, follow_source = await self._load_source()
        if self.worker.programs_kernel:
            await asyncio.to_thread(policy_routing(self.config).install)  # pyroute2 runs its own loop
        await self.relay.start("127.0.0.1", self.config.dataplane.tcpProxyPort, self.worker.listener)
        if self.worker.programs_kernel:  # other workers serve TCP (IPv4) only
            await self.udp.start("127.0.0.1", self.config.dataplane.udpProxyPort)
            try:
                await self.udp.start("::1", self.config.dataplane.udpProxyPort)
            except OSError as err:  # no IPv6 on this node
                log.warning("no IPv6 UDP listener (%s): serving IPv4 only", err)
        self._install_signals()
        log.info("pyproxy serving on node %s", self.node_name)
        self.runner.request()
        self.supervisor.start("sync-runner", self._run_sync)
        self.supervisor.start("health-metrics-debug", self._run_observer)  # workers: debug only
        self.supervisor.start(source_name, follow_source)
        try:
            await self.stop.wait()
        finally:
            await self._shutdown()
        return 0

    async def _run_sync(self, job: Job) -> None:
        job.activity = "running syncs"
        job.up()
        await self.runner.run(self.stop)

    async def _run_observer(self, job: Job) -> None:
        job.activity = "serving health and metrics"
        job.up()
        await self.observer.run(self.stop)

    def _install_loop_errors(self) -> None:
        """Whatever reaches the event loop's exception handler (an error in a callback,
        asyncio's own accept failures) is counted and logged at a bounded rate: the first
        of a kind with its traceback, then one line with the count per window."""
        errors = ErrorLog(self.stats.connection_errors, logging.getLogger("pyproxy.loop"))

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            message = str(context.get("message") or "unhandled error")
            errors.note("loop", exc if isinstance(exc, BaseException) else None,
                        f"event loop: {message}" + (f": {exc!r}" if exc is not None else ""),
                        key=f"{message} {type(exc).__name__}", level=logging.ERROR)

        asyncio.get_running_loop().set_exception_handler(handle)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            log.warning("second signal: exiting without waiting for connections")
            self.force = True
            for pair in list(self.relay.pairs):
                pair.close(abort=True)
        self.stop.set()

    async def _shutdown(self) -> None:
        self.relay.stop_accepting()
        await self.supervisor.close()
        open_connections = len(self.relay.pairs)
        if open_connections:
            log.info("draining %d open connections (up to %.0fs)", open_connections, self.config.dataplane.drainTimeout)
        cut = await self.relay.drain(0 if self.force else self.config.dataplane.drainTimeout)
        self.udp.close()  # UDP has nothing to drain: answers in flight got the drain period
        log.info("stopped; %d connections cut at the drain bound; rules left in place", cut)


def local_detection(config: ProxyConfig) -> LocalDetection:
    return LocalDetection(
        mode=config.detectLocalMode,
        cluster_cidrs=tuple(str(n) for n in parse_cidrs(config.clusterCIDR)),
        bridge_interface=config.detectLocal.bridgeInterface,
        interface_prefix=config.detectLocal.interfaceNamePrefix,
    )


def _log_conflict(key: ServiceKey, frontend: Frontend, owner: ServiceKey) -> None:
    ip, protocol, port = frontend
    log.error("Service %s: %s/%s is already served for Service %s; not serving it", key, join_host_port(ip, port),
              protocol, owner)
