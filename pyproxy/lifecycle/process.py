"""The life of one pyproxy process: how it starts, hands over, retires and drains.

What the process offers its life is narrow (`Process`): its relays (the listeners and the
connections), its store and table (the state), the fds of its HTTP listeners, a mark that
changes with its state, and a way to stop its own work (syncs, watches, HTTP). `app.py`
assembles such a process; this module never imports it.

Start (`ProcessLife.begin`, then `listen`): look for a running predecessor on the hand-over
socket and take its listeners and state, or else read the state snapshot a crashed one left
(`begin`); the app then loads its input and syncs; `restore_affinity` puts the pins back;
`listen` serves on the listeners (inherited, bound early, or bound here: retrying while a
refused predecessor still holds them). A failure before serving closes what was received,
and a predecessor keeps serving (`abort`).

Under a supervisor (master.py, through `link`): the listeners the process serves on are
sent to it before a predecessor is told we serve, the hand-over socket once bound, and
`serving`; a hand-over's `giving`, `kept` and `gone` are told to it too (link.py).

Ends of a process (`live`): (1) a successor takes over (handover.py): this one stops
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
import logging
import signal
import socket
import time
from typing import Any, Protocol

from pyproxy.config import ProxyConfig, split_host_port
from pyproxy.dataplane.dualstack import DualStackRelay
from pyproxy.dataplane.letgo import empty_the_queues
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.dataplane.workers import WorkerRole
from pyproxy.lifecycle.handover import (
    HandOverServer,
    Identity,
    Inherited,
    Outcome,
    complete,
    identity_of,
    socket_path,
    take_over,
)
from pyproxy.lifecycle.link import SupervisorLink
from pyproxy.lifecycle.listeners import listener_names, serve_listeners
from pyproxy.lifecycle.snapshot import Deferred, SnapshotWriter, read_snapshot, snapshot_path
from pyproxy.lifecycle.state import (
    StateError,
    StoreEncoder,
    affinity_state,
    restore_affinity,
    restore_store,
    store_state,
)
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable

log = logging.getLogger("pyproxy")

TAKE_OVER_ATTEMPTS = 3
TAKE_OVER_PAUSE = 0.5  # seconds between attempts at a hand-over that broke off


class Process(Protocol):
    """What a serving process offers its life: listeners, state and connections."""

    @property
    def relay(self) -> DualStackRelay: ...

    @property
    def udp(self) -> UdpRelay: ...

    @property
    def store(self) -> ClusterStore: ...

    @property
    def table(self) -> ServiceTable: ...

    def http_listeners(self) -> list[tuple[int, int]]: ...  # (port, fd) of the health/metrics servers

    def state_mark(self) -> object: ...  # changes whenever the state would (the last sync, say)

    async def stop_work(self) -> None: ...  # syncs, watches and HTTP servers end


class ProcessLife:
    def __init__(self, config: ProxyConfig, worker: WorkerRole, node_name: str, process: Process,
                 early: dict[str, socket.socket] | None = None, link: SupervisorLink | None = None) -> None:
        self.config, self.worker, self.node_name, self.process = config, worker, node_name, process
        self.link = link or SupervisorLink(None)  # the supervisor that holds the listeners (master.py)
        self.inherited: dict[str, socket.socket] = dict(early or {})  # until a server takes them
        self.terminating = asyncio.Event()  # SIGTERM/SIGINT: serve on until a successor or the drain bound
        self.forced = asyncio.Event()  # a second signal: leave now
        self.handover: HandOverServer | None = None
        self.handed: Inherited | None = None
        self.force = False
        self.stop_now = False  # the drain bound passed with no successor: what is left is cut
        self.cut = 0
        self.drained = False
        self._affinity: tuple[Any, float] | None = None
        self._handover_task: asyncio.Task[None] | None = None
        life = config.lifecycle
        self._encoder = StoreEncoder()
        self.snapshots = SnapshotWriter(snapshot_path(life.stateDir, worker.index), node_name, self.snapshot_body,
                                        self._generation, life.snapshotInterval)

    # --- start

    async def begin(self) -> None:
        """Take over from a running predecessor, or restore a crashed one's snapshot."""
        life = self.config.lifecycle
        outcome = Outcome()
        if self.worker.listener is None and not self.inherited:  # bound here: nobody else holds them
            path = socket_path(life.stateDir, self.worker.index)
            for attempt in range(TAKE_OVER_ATTEMPTS):
                outcome = await asyncio.to_thread(take_over, path, self.identity(), life.handOverTimeout)
                if not outcome.failed:
                    break
                # the predecessor broke off (it may have crashed: its supervisor starts another, which
                # answers on the same socket); else bind once it lets go, as for a refusal
                log.info("asking for the hand-over again (%d of %d)", attempt + 2, TAKE_OVER_ATTEMPTS)
                await asyncio.sleep(TAKE_OVER_PAUSE)
        self.handed = outcome.inherited
        self._affinity = self._restore(outcome)

    def restore_affinity(self) -> None:
        """After the first sync: the pins restored with the store, aged by the time they were away."""
        if self._affinity is None or self._affinity[0] is None:
            return
        raw, extra_age = self._affinity
        try:
            count = restore_affinity(self.process.table, raw, time.monotonic(), extra_age)
        except StateError as err:
            log.error("ignoring the restored affinity pins: %s", err)
            return
        log.info("restored %d affinity pins", count)

    async def listen(self) -> None:
        """Serve on the listeners (see listeners.py)."""
        if self.handed is not None:
            self.inherited.update(self.handed.sockets)
            self.handed.sockets.clear()
        dp = self.config.dataplane
        await serve_listeners(self.inherited, self.process.relay, self.process.udp, tcp_port=dp.tcpProxyPort,
                              udp_port=dp.udpProxyPort, programs_kernel=self.worker.programs_kernel,
                              worker_listener=self.worker.listener)
        if self.handed is not None:
            self.process.udp.hold_listener()  # until the predecessor's UDP flows are here (dataplane/udp.py)
        # the supervisor keeps copies before a predecessor is told we serve (it then lets go of its own)
        http = [(name, sock.fileno()) for name, sock in self.inherited.items() if name in self._held_http()]
        self.link.listeners(listener_names(self.process.relay, self.process.udp, []) + http)
        self.link.send("serving")

    def abort(self) -> None:
        """Starting failed: close what was received; a predecessor keeps serving."""
        for sock in self.inherited.values():
            sock.close()
        self.inherited.clear()
        if self.handed is not None:
            self.handed.channel.close()
            self.handed.close_unused()

    def take_socket(self, port: int) -> socket.socket | None:
        """An HTTP listener handed over or bound early, for the observer. Under a supervisor
        (which holds a copy, so the port cannot be bound again) a copy is given and the
        original kept: an HTTP server started again after a failure takes another."""
        name = f"http:{port}"
        if not self.link.supervised or name not in self._held_http():
            return self.inherited.pop(name, None)
        sock = self.inherited.get(name)
        return sock.dup() if sock is not None else None

    def _held_http(self) -> set[str]:
        """The HTTP listeners a supervisor holds: /healthz and /metrics (health check node
        ports come and go with Services: they stay this process's)."""
        held = set()
        for address in (self.config.healthzBindAddress, self.config.metricsBindAddress):
            if address:
                held.add(f"http:{split_host_port(address, 'bind address')[1]}")
        return held

    def _close_http(self) -> None:
        """This process serves HTTP no more: its kept originals go (a successor has its own)."""
        for name in [n for n in self.inherited if n.startswith("http:")]:
            self.inherited.pop(name).close()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    # --- serve until a successor, a signal or the drain bound ends it

    async def live(self) -> None:
        """Finish taking over, answer successors, and return when the process may leave."""
        if self.handed is not None:
            try:
                await complete(self.handed, self, self.process)
            finally:
                self.process.udp.read_listener()
        self._handover_task = asyncio.get_running_loop().create_task(self._serve_handover(), name="hand-over")
        try:
            await self._lifetime()
        finally:
            await self._stop_handover()
            await self._shutdown()
            for sock in self.inherited.values():  # taken over but never served (a server turned off)
                sock.close()

    # --- what a successor is given (handover.Giver and Taker)

    def identity(self, probe: bool = False) -> Identity:
        return identity_of(self.config, self.node_name, self.worker.index, self.worker.count, probe)

    def state_body(self) -> dict[str, Any]:
        return {"sync": store_state(self.process.store),
                "affinity": affinity_state(self.process.table, time.monotonic())}

    def snapshot_body(self) -> dict[str, Any]:
        """`state_body` for the file: the store captured here, encoded in the writer's thread."""
        captured = StoreEncoder.capture(self.process.store)
        return {"sync": Deferred(lambda: self._encoder.chunks(captured)),
                "affinity": affinity_state(self.process.table, time.monotonic())}

    def affinity_body(self) -> dict[str, Any]:
        return {"affinity": affinity_state(self.process.table, time.monotonic())}

    def merge_affinity(self, body: Any) -> int:
        try:
            return restore_affinity(self.process.table, body.get("affinity") if isinstance(body, dict) else None,
                                    time.monotonic())
        except StateError as err:
            log.error("hand-over: ignoring the final affinity pins: %s", err)
            return 0

    def listener_sockets(self) -> list[tuple[str, int]]:
        return listener_names(self.process.relay, self.process.udp, self.process.http_listeners())

    async def release_listeners(self) -> None:
        """Step 6: the successor serves; stop accepting (nothing reset), stop syncing and watching."""
        self.process.relay.release_listener()
        self.process.udp.release_listener()
        await self.process.stop_work()  # the servers close their copies of the HTTP listeners
        self._close_http()

    # --- internals

    def _generation(self) -> object:
        """Changes whenever the snapshot would (a sync, any affinity hit, miss or eviction)."""
        marks: list[object] = [self.process.state_mark()]
        for balancer in self.process.table.affine.values():  # not every port: those with affinity
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
            state = read_snapshot(path, self.node_name, self.config.lifecycle.snapshotMaxAge)
            if state is None:
                return None, 0.0
            age = float(state["age"])
            what = f"the snapshot {path} ({age:.1f}s old)"
        if not self.config.manifests or outcome.inherited is not None:  # manifests are read again anyway
            try:
                count = restore_store(self.process.store, state.get("sync"))
                log.info("restored %d services from %s", count, what)
            except StateError as err:
                log.error("ignoring the sync state of %s: %s", what, err)
        return state.get("affinity"), age

    async def _serve_handover(self) -> None:
        life = self.config.lifecycle
        server = HandOverServer(socket_path(life.stateDir, self.worker.index), self, self.process,
                                life.handOverTimeout, lambda what: self.link.send(what, {"why": "a successor serves"}))
        kept = self.inherited.pop("handover", None)  # bound by an earlier process of our supervisor
        if kept is not None:
            server.adopt(kept)
        else:
            try:
                await asyncio.to_thread(server.bind)
            except OSError as err:
                log.error("cannot listen for a successor on %s: %s; a restart will not hand over", server.path, err)
                return
            if server.sock is not None:
                self.link.listeners([("handover", server.sock.fileno())], server.inode)
        self.handover = server
        await server.serve()

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
                    relay = self.process.relay
                    await empty_the_queues([s for s in (relay.listener, relay.listener6) if s is not None])
                    self.link.send("gone", {"why": f"released for a refused successor: {server.refused}"})
                    relay.release_listener()
                    self.process.udp.release_listener()
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
        relay = self.process.relay
        open_connections = len(relay.pairs)
        if open_connections:
            log.info("draining %d open connections (up to %.0fs)", open_connections,
                     self.config.dataplane.drainTimeout)
        self.cut = await relay.drain(0 if self.force else self.config.dataplane.drainTimeout)
        self.drained = True

    def _on_signal(self) -> None:
        if self.terminating.is_set():
            log.warning("second signal: exiting without waiting for connections")
            self.force = True
            self.forced.set()
            for pair in list(self.process.relay.pairs):
                pair.close(abort=True)
        self.terminating.set()

    async def _shutdown(self) -> None:
        self.process.relay.stop_accepting()  # reset from now on (a listener still held is closed by drain)
        await self.process.stop_work()
        self._close_http()
        if not self.drained:
            if self.stop_now:
                self.force = True  # serving went on to the drain bound: what is left is cut
            await self._drain_open()
        self.process.udp.close()  # UDP has nothing to drain: answers in flight got the drain period
        log.info("stopped; %d connections cut at the drain bound; rules left in place", self.cut)
