"""Assembles a running proxy from a config: source -> store -> sync runner -> kernel + relay.

Start-up order keeps the kernel untouched until the input is known good: the process's
life (pyproxy/lifecycle/process.py) first takes a running predecessor's listeners and state,
or the snapshot a crashed one left; then the input is loaded (and validated), policy
routing installed, one sync run if the store is already complete (handed over, restored,
or the manifests; a process its supervisor started after a crash does both at once, the
crashed one having installed the routing), affinity restored, and only then does it serve
on the listeners (the supervisor's, lifecycle/master.py, when it has them). The
rules are rewritten in one transaction, never flushed, so a restart never opens a hole in
them. How a process ends (hand-over, SIGTERM, drain) is lifecycle/process.py's.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import random
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pyproxy.config import ProxyConfig, node_name_of
from pyproxy.dataplane.dualstack import DualStackRelay
from pyproxy.dataplane.errors import ErrorLog
from pyproxy.dataplane.libnft import open_runner
from pyproxy.dataplane.netlinkwatch import ChangeWatch
from pyproxy.dataplane.nft import NftConfig, NftRunner
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import make_splice_relay
from pyproxy.dataplane.workers import NullNftRunner, WorkerRole
from pyproxy.dataplane.routing import (
    PolicyRouting,
    interface_routes,
    local_addresses,
    pod_bridges,
    reply_bridges,
)
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpConfig, UdpRelay
from pyproxy.inspect.reader import ProxyReader
from pyproxy.lifecycle.link import SupervisorLink
from pyproxy.lifecycle.process import ProcessLife
from pyproxy.model.source import SourcePolicy
from pyproxy.model.family import join_host_port, node_port_candidate
from pyproxy.model.objects import ServiceKey
from pyproxy.observe.metrics import CountingStore
from pyproxy.observe.observer import Observer
from pyproxy.model.table import Frontend, ServiceTable
from pyproxy.model import nodeports
from pyproxy.model.localdetect import LocalDetection
from pyproxy.proxier import Proxier, SyncResult, parse_cidrs
from pyproxy.sources.manifests import ManifestSnapshot, fingerprint, load_manifests, watch_manifests
from pyproxy.supervisor import Job, Supervisor
from pyproxy.sync import SyncRunner

log = logging.getLogger("pyproxy")


class StartupError(RuntimeError):
    pass


def policy_routing(config: ProxyConfig) -> PolicyRouting:
    dp = config.dataplane
    return PolicyRouting(mark=dp.mark, table=dp.routeTable, priority=dp.rulePriority,
                         reentry_mark=dp.reentryMark)


class ProxyApp:
    def __init__(self, config: ProxyConfig, worker: WorkerRole | None = None,
                 early: dict[str, socket.socket] | None = None, link: SupervisorLink | None = None) -> None:
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
        self._node_changes = ChangeWatch()  # before the first read of the node (dataplane/netlinkwatch.py)
        self.proxier = Proxier(
            store=self.store,
            table=self.table,
            nft=open_runner(dp.nftables) if self.worker.programs_kernel else NullNftRunner(),
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
            reply_bridges=lambda names: reply_bridges(names, hold=self.worker.programs_kernel),
            node_changes=self._node_changes.changed,
        )
        self.runner = SyncRunner(self.proxier.sync, config.minSyncPeriod, config.syncPeriod)
        relay_config = RelayConfig(
            dial_timeouts=dp.dialTimeouts,
            idle_timeout=dp.tcpIdleTimeout,
            half_close_timeout=dp.tcpHalfCloseTimeout,
        )

        def make_relay() -> TcpRelay:  # one per address family (dualstack.py)
            # the compiled engine (engine.py), or its pure-Python twin (splice.py)
            return make_splice_relay(self.table, self.proxier.is_local_source, self.stats, relay_config,
                                     splice_after=dp.spliceAfter, sources=self._sources)

        self.relay = DualStackRelay(make_relay, serve_ipv6=self.worker.programs_kernel)
        self.udp = UdpRelay(
            table=self.table,
            is_local_source=self.proxier.is_local_source,
            sources=self._sources,
            stats=self.stats,
            config=UdpConfig(idle_timeout=dp.udpIdleTimeout, max_flows=dp.maxUDPFlows),
        )
        self._transport: Any = None  # the API client (cluster mode), for the restart Event
        self._restart_event: asyncio.Future[None] | None = None
        self.stop = asyncio.Event()  # set: every supervised task ends (the process is leaving)
        self.supervisor = Supervisor(self.stop)  # every long-lived task runs under it
        self.life = ProcessLife(config, self.worker, self.node_name, self, early, link)
        reader = ProxyReader(self.store, self.table, lambda: itertools.chain(self.relay.connections(),
                                                                             self.udp.connections()),
                             shutting_down=self.stop.is_set, worker=self.worker.index)
        self.observer = Observer(config, self.store, self.table, self.stats, self.runner, reader, self.worker,
                                 down=lambda: self.supervisor.down,
                                 take_socket=self.life.take_socket, relay=self.relay.label)

    def _sources(self) -> SourcePolicy:
        """Whose address endpoints see, as of the last sync (the proxier's; model/source.py)."""
        return self.proxier.sources

    def _node_port_addresses(self) -> list[str]:
        """The local addresses that serve NodePorts (netlink; `primary` reads the Node)."""
        node = self.store.node
        candidates = [a for a in local_addresses() if node_port_candidate(a)]  # never link-local or ::1
        return nodeports.select(candidates, self.config.nodePortAddresses, node.host_ips if node else ())

    def _synced(self, result: SyncResult) -> None:
        self.observer.synced(result.seconds)  # sync metrics; health check endpoint counts
        self.udp.on_sync()  # flows to endpoints that just left are dropped
        log.info(
            "synced %d services (%s write: +%d -%d elements) in %.1f ms (%.1f ms of CPU)",
            result.changed, "full" if result.full else "incremental", result.added, result.removed,
            result.seconds * 1000, result.cpu_seconds * 1000,
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
            # imported here: standalone never needs the API client, and a restart after a
            # crash serves sooner without loading it (lifecycle/early.py)
            from pyproxy.sources.kube import KubeSource
            from pyproxy.sources.kube_client import SourceError
            from pyproxy.sources.kube_http import open_transport

            client = self.config.clientConnection
            try:
                transport = await asyncio.to_thread(open_transport, client.kubeconfig, client.apiServer)
            except SourceError as err:
                raise StartupError(f"{err} (give --manifests DIR, --kubeconfig or --master)") from None
            kube = KubeSource(self.store, self.runner.request, transport, self.node_name, self.config.proxyName or None)
            self._transport = transport

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
        life = self.life
        await life.begin()  # the predecessor's state and listeners, or a crashed one's snapshot
        try:
            source_name, follow_source = await self._load_source()
            if self.worker.programs_kernel:
                install = asyncio.to_thread(policy_routing(self.config).install)  # pyroute2 runs its own loop
                if self.life.link.respawned and self.store.synced:  # a crashed predecessor installed it
                    await asyncio.gather(install, self.runner.run_now())  # so rewrite it beside the sync
                else:
                    await install
            if self.store.synced and self.runner.last_success is None:  # the table before the listener
                await self.runner.run_now()
            life.restore_affinity()
            await life.listen()
        except BaseException:
            life.abort()
            raise
        life.install_signals()
        log.info("pyproxy serving on node %s (TCP relay: %s)", self.node_name, self.relay.describe())
        if self.life.link.restarts and self._transport is not None and self.worker.programs_kernel:
            self._restart_event = asyncio.ensure_future(asyncio.to_thread(self._post_restart_event))
        self.runner.request()
        self.supervisor.start("sync-runner", self._run_sync)
        self.supervisor.start("health-metrics-debug", self._run_observer)  # workers: debug only
        self.supervisor.start(source_name, follow_source)
        if self.config.lifecycle.snapshotInterval > 0:
            self.supervisor.start("state-snapshot", self._run_snapshots)
        await life.live()
        return 0

    def _post_restart_event(self) -> None:
        """Best effort, after serving (the log line of the supervisor is the record)."""
        from pyproxy.sources.kube_events import restart_event

        link = self.life.link
        body = restart_event(self.node_name, link.restarts, link.crash_loop, datetime.datetime.now(datetime.timezone.utc))
        try:
            self._transport.post_event("default", body)
        except Exception as err:  # noqa: BLE001 - an Event is a courtesy
            log.warning("cannot post the %s Event: %s", body["reason"], err)

    # --- what the process offers its life (lifecycle.process.Process)

    def http_listeners(self) -> list[tuple[int, int]]:
        return self.observer.listening()

    def state_mark(self) -> object:
        return self.runner.last_success

    async def stop_work(self) -> None:
        self.stop.set()
        await self.supervisor.close()
        self._node_changes.close()

    # --- the long-lived jobs

    async def _run_snapshots(self, job: Job) -> None:
        job.activity = "writing the state snapshot"
        job.up()
        await self.life.snapshots.run(self.stop)

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
