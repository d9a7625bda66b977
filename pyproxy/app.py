"""Assembles a running proxy from a config: source -> store -> sync runner -> kernel + relay.

Start-up order keeps the kernel untouched until the input is known good: look for a
running predecessor on the hand-over socket (pyproxy/lifecycle) and take its listeners and
state, or else read the state snapshot a crashed one left; load (and validate) the input;
install policy routing; sync once if the store is already complete (handed over, restored,
or the manifests); restore affinity; only then serve on the listeners (inherited, or bound
here: retrying while a refused predecessor still holds them). The rules are rewritten in
one transaction, never flushed, so a restart never opens a hole in them.

Ends of a process: (1) a successor takes over (lifecycle/handover.py): this one stops
accepting, hands over the rest, drains what it still holds, then exits (or waits for
SIGTERM: `lifecycle.afterHandOver: wait`); (2) SIGTERM with no successor: it serves on --
new connections, API watches, an honest /healthz -- until a successor takes over or
`drainTimeout` passes, then stops accepting and cuts what is left; (3) SIGTERM after it
refused a successor (another protocol version): it releases its listeners at once for the
successor to bind and drains its open connections up to `drainTimeout`, as before. A second
signal exits at once. The rules are left in place (`--cleanup` removes them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import errno
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pyproxy.config import ProxyConfig
from pyproxy.dataplane.dualstack import DualStackRelay
from pyproxy.dataplane.errors import ErrorLog
from pyproxy.dataplane.nft import NftConfig, NftRunner
from pyproxy.dataplane.relay import Relay, RelayConfig
from pyproxy.dataplane.sockets import transparent_listener
from pyproxy.dataplane.splice import TcpRelay, make_splice_relay
from pyproxy.dataplane.workers import NullNftRunner, WorkerRole
from pyproxy.dataplane.routing import PolicyRouting, interface_routes, local_addresses, pod_bridges
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpConfig, UdpRelay
from pyproxy.inspect.reader import ProxyReader
from pyproxy.lifecycle.handover import HandOverServer, Identity, Inherited, Outcome, complete, identity_of, socket_path, take_over
from pyproxy.lifecycle.snapshot import SnapshotWriter, read_snapshot, snapshot_path
from pyproxy.lifecycle.state import StateError, affinity_state, restore_affinity, restore_store, store_state
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


def node_name_of(config: ProxyConfig) -> str:
    return config.hostnameOverride or socket.gethostname()


def policy_routing(config: ProxyConfig) -> PolicyRouting:
    dp = config.dataplane
    return PolicyRouting(mark=dp.mark, table=dp.routeTable, priority=dp.rulePriority,
                         reentry_mark=dp.reentryMark)


class ProxyApp:
    def __init__(self, config: ProxyConfig, worker: WorkerRole | None = None,
                 early: dict[str, socket.socket] | None = None) -> None:
        self.config = config
        self.early = dict(early or {})  # listeners bound before the imports (lifecycle/early.py)
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
            if dp.relay == "splice":  # the compiled engine (engine.py), or its pure-Python twin (splice.py)
                return make_splice_relay(self.table, self.proxier.is_local_source, self.stats, relay_config,
                                         splice_after=dp.spliceAfter)
            return Relay(table=self.table, is_local_source=self.proxier.is_local_source, stats=self.stats,
                         config=relay_config)

        self.relay = DualStackRelay(make_relay, serve_ipv6=self.worker.programs_kernel)
        self.udp = UdpRelay(
            table=self.table,
            is_local_source=self.proxier.is_local_source,
            stats=self.stats,
            config=UdpConfig(idle_timeout=dp.udpIdleTimeout, max_flows=dp.maxUDPFlows),
        )
        self.stop = asyncio.Event()  # set: every supervised task ends (the process is leaving)
        self.terminating = asyncio.Event()  # SIGTERM/SIGINT: serve on until a successor or the drain bound
        self.forced = asyncio.Event()  # a second signal: leave now
        self.supervisor = Supervisor(self.stop)  # every long-lived task runs under it
        self.inherited: dict[str, socket.socket] = {}  # listeners handed over, until their server takes them
        self.handover: HandOverServer | None = None
        life = config.lifecycle
        self.snapshots = SnapshotWriter(snapshot_path(life.stateDir, self.worker.index), self.node_name,
                                        self.state_body, self._generation, life.snapshotInterval)
        reader = ProxyReader(self.store, self.table, lambda: itertools.chain(self.relay.connections(),
                                                                             self.udp.connections()),
                             shutting_down=self.stop.is_set, worker=self.worker.index)
        self.observer = Observer(config, self.store, self.table, self.stats, self.runner, reader, self.worker,
                                 down=lambda: self.supervisor.down,
                                 take_socket=lambda port: self.inherited.pop(f"http:{port}", None))
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
            # imported here: standalone never needs the API client, and a restart after a
            # crash serves sooner without loading it (lifecycle/early.py)
            from pyproxy.sources.kube import KubeSource
            from pyproxy.sources.kube_client import SourceError, open_transport

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
        life = self.config.lifecycle
        outcome = Outcome()
        if self.worker.listener is None and not self.early:  # bound here: nobody else holds them
            outcome = await asyncio.to_thread(take_over, socket_path(life.stateDir, self.worker.index),
                                              self.identity(), life.handOverTimeout)
        handed = outcome.inherited
        affinity, extra_age = self._restore(outcome)
        try:
            source_name, follow_source = await self._load_source()
            if self.worker.programs_kernel:
                await asyncio.to_thread(policy_routing(self.config).install)  # pyroute2 runs its own loop
            if self.store.synced:  # handed over, restored, or the manifests: the table before the listener
                await self.runner.run_now()
            if affinity is not None:
                self._restore_affinity(affinity, extra_age)
            await self._listen(handed, outcome)
            if handed is not None:
                self.udp.hold_listener()  # until the predecessor's UDP flows are here (dataplane/udp.py)
        except BaseException:
            for sock in self.early.values():
                sock.close()
            if handed is not None:
                handed.channel.close()  # the predecessor keeps serving
                handed.close_unused()
            raise
        self._install_signals()
        log.info("pyproxy serving on node %s (TCP relay: %s)", self.node_name, self.relay.describe())
        self.runner.request()
        self.supervisor.start("sync-runner", self._run_sync)
        self.supervisor.start("health-metrics-debug", self._run_observer)  # workers: debug only
        self.supervisor.start(source_name, follow_source)
        if life.snapshotInterval > 0:
            self.supervisor.start("state-snapshot", self._run_snapshots)
        if handed is not None:
            try:
                await complete(handed, self, self)
            finally:
                self.udp.read_listener()
        self._handover_task = asyncio.get_running_loop().create_task(self._serve_handover(), name="hand-over")
        try:
            await self._lifetime()
        finally:
            await self._stop_handover()
            await self._shutdown()
            for sock in self.inherited.values():  # taken over but never served (a server turned off)
                sock.close()
        return 0

    # --- the lifecycle (pyproxy/lifecycle): hand-over, snapshot, the ways a process ends

    def identity(self, probe: bool = False) -> Identity:
        return identity_of(self.config, self.node_name, self.worker.index, self.worker.count, probe)

    def state_body(self) -> dict[str, Any]:
        return {"sync": store_state(self.store), "affinity": affinity_state(self.table, time.monotonic())}

    def affinity_body(self) -> dict[str, Any]:
        return {"affinity": affinity_state(self.table, time.monotonic())}

    def merge_affinity(self, body: Any) -> int:
        try:
            return restore_affinity(self.table, body.get("affinity") if isinstance(body, dict) else None,
                                    time.monotonic())
        except StateError as err:
            log.error("hand-over: ignoring the final affinity pins: %s", err)
            return 0

    def _generation(self) -> object:
        """Changes whenever the snapshot would (a sync, any affinity hit, miss or eviction)."""
        marks: list[object] = [self.runner.last_success]
        for balancer in self.table.balancers.values():
            if balancer.affinity is not None:
                stats = balancer.affinity.stats
                marks.append((stats.hits, stats.misses, stats.evictions, len(balancer.affinity)))
        return tuple(marks)

    def _restore(self, outcome: Outcome) -> tuple[Any, float]:
        """The store from the hand-over or the snapshot; returns the affinity part to restore
        after the first sync, and how old it already is."""
        if outcome.inherited is not None:
            state: Any = outcome.inherited.state
            age = 0.0
            what = "the hand-over"
        elif outcome.found:
            return None, 0.0  # a predecessor runs (refused): its state is its own
        else:
            path = snapshot_path(self.config.lifecycle.stateDir, self.worker.index)
            state = read_snapshot(path, self.node_name)
            if state is None:
                return None, 0.0
            age = float(state["age"])
            what = f"the snapshot {path} ({age:.1f}s old)"
        if not self.config.manifests or outcome.inherited is not None:  # manifests are read again anyway
            try:
                count = restore_store(self.store, state.get("sync"))
                log.info("restored %d services from %s", count, what)
            except StateError as err:
                log.error("ignoring the sync state of %s: %s", what, err)
        return state.get("affinity"), age

    def _restore_affinity(self, raw: Any, extra_age: float) -> None:
        try:
            count = restore_affinity(self.table, raw, time.monotonic(), extra_age)
        except StateError as err:
            log.error("ignoring the restored affinity pins: %s", err)
            return
        log.info("restored %d affinity pins", count)

    async def _listen(self, handed: Inherited | None, outcome: Outcome) -> None:
        """Serve on the listeners: handed over, bound early (lifecycle/early.py), the worker's,
        or bound here (waiting while a refused predecessor still holds them). UDP first: it
        binds beside a refused predecessor's socket at once (SO_REUSEADDR: the newer reads)."""
        dp = self.config.dataplane
        got = dict(self.early)
        self.early.clear()
        if handed is not None:
            got.update(handed.sockets)
            handed.sockets.clear()
        tcp = self.worker.listener or got.pop("tcp", None)
        tcp6, udp, udp6 = got.pop("tcp6", None), got.pop("udp", None), got.pop("udp6", None)
        self.inherited.update(got)  # the HTTP listeners, for the observer
        if self.worker.programs_kernel:  # other workers serve TCP (IPv4) only
            if udp is None:
                udp = await self._bind("127.0.0.1", socket.SOCK_DGRAM, dp.udpProxyPort, True)
            await self.udp.start("127.0.0.1", dp.udpProxyPort, udp)
            if udp6 is None:
                udp6 = await self._bind_ipv6(socket.SOCK_DGRAM, dp.udpProxyPort, True)
            if udp6 is not None:
                await self.udp.start("::1", dp.udpProxyPort, udp6)
            if tcp6 is None:
                tcp6 = await self._bind_ipv6(socket.SOCK_STREAM, dp.tcpProxyPort, True)
        else:
            for sock in (udp, udp6, tcp6):
                if sock is not None:
                    sock.close()
            tcp6 = None
        if tcp is None:
            tcp = await self._bind("127.0.0.1", socket.SOCK_STREAM, dp.tcpProxyPort, True)
        await self.relay.start("127.0.0.1", dp.tcpProxyPort, tcp, tcp6)

    async def _bind_ipv6(self, kind: int, port: int, wait: bool) -> socket.socket | None:
        """The [::1] listener, or None on a node without IPv6 (one warning line)."""
        try:
            return await self._bind("::1", kind, port, wait)
        except OSError as err:  # EAFNOSUPPORT, or EADDRNOTAVAIL without ::1
            what = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
            log.warning("no IPv6 %s listener on [::1]:%d (%s): serving IPv4 only", what, port, err)
            return None

    async def _bind(self, host: str, kind: int, port: int, wait: bool) -> socket.socket:
        """A new transparent listener; while the port is held (a refused predecessor, or a
        release without hand-over that will release it when it stops), retry."""
        waiting_since = time.monotonic()
        while True:
            try:
                return transparent_listener(host, port, kind)
            except OSError as err:
                if not wait or err.errno != errno.EADDRINUSE:
                    raise
            if time.monotonic() - waiting_since < 0.01:
                log.info("waiting for the running pyproxy to release %s (one that refused the hand-over, "
                         "or an older release without it: it releases the port when it stops)",
                         join_host_port(host, port))
            await asyncio.sleep(0.01)

    async def _serve_handover(self) -> None:
        life = self.config.lifecycle
        server = HandOverServer(socket_path(life.stateDir, self.worker.index), self, self, life.handOverTimeout)
        try:
            await asyncio.to_thread(server.bind)
        except OSError as err:
            log.error("cannot listen for a successor on %s: %s; a restart will not hand over", server.path, err)
            return
        self.handover = server
        await server.serve()

    def listener_sockets(self) -> list[tuple[str, int]]:
        named: list[tuple[str, int]] = []
        for name, sock in (("tcp", self.relay.listener), ("tcp6", self.relay.listener6)):
            if sock is not None:
                named.append((name, sock.fileno()))
        for sock in self.udp.listeners:
            named.append(("udp6" if sock.family == socket.AF_INET6 else "udp", sock.fileno()))
        for port, fd in self.observer.listening():
            named.append((f"http:{port}", fd))
        return named

    async def release_listeners(self) -> None:
        """Step 6: the successor serves; stop accepting (nothing reset), stop syncing and watching."""
        self.relay.release_listener()
        self.udp.release_listener()
        self.stop.set()
        await self.supervisor.close()  # the servers close their copies of the HTTP listeners

    async def _lifetime(self) -> None:
        """Until this process may leave (see the module's header)."""
        handed_over = asyncio.ensure_future(self._handed_over())
        terminating = asyncio.ensure_future(self.terminating.wait())
        try:
            await asyncio.wait({handed_over, terminating}, return_when=asyncio.FIRST_COMPLETED)
            if not handed_over.done():
                server = self.handover
                if server is not None and server.refused is not None:
                    log.info("stopping after refusing a successor (%s): releasing the listeners and draining",
                             server.refused)
                    await self._stop_handover()  # a waiting supervisor of workers sees nobody here any more
                    self.relay.release_listener()
                    self.udp.release_listener()
                    return
                drain = self.config.dataplane.drainTimeout
                log.info("stopping with no successor: still serving for up to %.0fs (until a successor takes over)",
                         drain)
                forced = asyncio.ensure_future(self.forced.wait())
                try:
                    await asyncio.wait({handed_over, forced}, timeout=drain, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    forced.cancel()
                if not handed_over.done():
                    self.stop_now = True
                    return
            await self._retire()
        finally:
            handed_over.cancel()
            terminating.cancel()

    stop_now = False  # the drain bound passed with no successor: what is left is cut
    _handover_task: asyncio.Task[None] | None = None

    async def _stop_handover(self) -> None:
        """No successor is answered any more (the socket closes after its accept is cancelled)."""
        task, self._handover_task = self._handover_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.handover is not None:
            self.handover.close()

    async def _handed_over(self) -> None:
        while self.handover is None:
            await asyncio.sleep(0.1)
        await self.handover.handed_over.wait()

    async def _retire(self) -> None:
        """Handed over: wait for the rest of the sequence, then drain what is still here."""
        assert self.handover is not None
        try:
            await asyncio.wait_for(self.handover.finished.wait(), 3 * self.config.lifecycle.handOverTimeout)
        except TimeoutError:
            log.error("hand-over: the successor did not finish the hand-over in time")
        if self.config.lifecycle.afterHandOver == "wait" and not self.terminating.is_set():
            await self._drain_open()
            log.info("handed over; waiting for SIGTERM (lifecycle.afterHandOver: wait)")
            await self.terminating.wait()

    async def _drain_open(self) -> None:
        open_connections = len(self.relay.pairs)
        if open_connections:
            log.info("draining %d open connections (up to %.0fs)", open_connections,
                     self.config.dataplane.drainTimeout)
        self.cut = await self.relay.drain(0 if self.force else self.config.dataplane.drainTimeout)
        self.drained = True

    cut = 0
    drained = False

    async def _run_snapshots(self, job: Job) -> None:
        job.activity = "writing the state snapshot"
        job.up()
        await self.snapshots.run(self.stop)

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
        if self.terminating.is_set():
            log.warning("second signal: exiting without waiting for connections")
            self.force = True
            self.forced.set()
            for pair in list(self.relay.pairs):
                pair.close(abort=True)
        self.terminating.set()

    async def _shutdown(self) -> None:
        self.relay.stop_accepting()  # reset from now on (a listener still held is closed by drain)
        self.stop.set()
        await self.supervisor.close()
        if not self.drained:
            if self.stop_now:
                self.force = True  # serving went on to the drain bound: what is left is cut
            await self._drain_open()
        self.udp.close()  # UDP has nothing to drain: answers in flight got the drain period
        log.info("stopped; %d connections cut at the drain bound; rules left in place", self.cut)


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
