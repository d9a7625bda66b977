"""Cluster source: Services, EndpointSlices and this Node from the API server (list + watch).

Theory of operation:
- One thread per watched kind runs a resumable list-then-watch loop (`Watcher`): list (in
  pages) into a snapshot, then watch from the list's resourceVersion with bookmarks; on 410
  Gone list again; after any other error reconnect with a capped, jittered backoff; when a
  watch ends or falls silent, watch again from the last resourceVersion. The decisions are
  pure (`kube_watch.WatchState`, `Backoff`); this module only does the I/O.
- The `kubernetes` client is synchronous, so it never runs on the event loop. Its raw JSON
  (`kube_client`) arrives as API-shaped dicts, the shape `pyproxy.model.objects` reads,
  and is parsed into model values still in the watch thread.
- Results reach the loop through a coalescing `Pending` per kind and one
  `call_soon_threadsafe` per batch; the loop applies them to the `ClusterStore` and nudges
  the sync runner. A list is a full snapshot (`replace_services`/`replace_slices`): those
  calls also mark the kind synced, so nothing is programmed before both first lists are in.
- Errors never clear the store: while the API server is away the last good state serves.
- An object that fails validation is skipped with a log line naming it and the reason, and
  a Warning Event about it is posted, best effort and rate-limited (`kube_events`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from pyproxy.heap import settle
from pyproxy.model.objects import (
    EndpointSlice,
    InvalidObject,
    Node,
    Report,
    Service,
    ServiceKey,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from pyproxy.model.store import ClusterStore
from pyproxy.sources.kube_client import SourceError, StatusError, Transport, is_transient
from pyproxy.sources.kube_events import InvalidObjectReporter
from pyproxy.sources.kube_watch import (
    Delete,
    Kind,
    ObjectKey,
    Pending,
    Reconnect,
    Relist,
    Skip,
    Upsert,
    WatchState,
    WatchTiming,
    watched_kinds,
)

log = logging.getLogger("pyproxy.kube")

MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner without any event counts as a failure


# -- per-kind parsing and store updates ------------------------------------------------------


@dataclass
class KindHandler:
    """How one kind's objects become model values, and how they land in the store."""

    kind: Kind
    parse: Callable[[Mapping[str, Any], Report], Any]
    apply: Callable[[ClusterStore, dict[ObjectKey, Any] | None, dict[ObjectKey, Any]], None]
    pending: Pending[ObjectKey, Any] = field(default_factory=Pending)
    on_invalid: Callable[[Mapping[str, Any], InvalidObject], None] | None = None

    def value(self, obj: Mapping[str, Any]) -> Any:
        """The model value of an object, or None when it is not ours or invalid (logged).
        A part left out (a port, an endpoint) is logged and reported the same way."""
        def part(err: InvalidObject) -> None:
            log.warning("skipping part of an object: %s", err)
            if self.on_invalid is not None:
                self.on_invalid(obj, err)

        try:
            return self.parse(obj, part)
        except InvalidObject as err:
            log.error("skipping invalid object: %s", err)
            if self.on_invalid is not None:
                self.on_invalid(obj, err)
            return None


def _apply_services(store: ClusterStore, snapshot: dict[ObjectKey, Service] | None, changes: dict[ObjectKey, Service | None]) -> None:
    if snapshot is not None:
        store.replace_services(v for v in snapshot.values() if v is not None)
    for (namespace, name), service in changes.items():
        store.upsert_service(ServiceKey(namespace or "default", name), service)


def _apply_slices(store: ClusterStore, snapshot: dict[ObjectKey, EndpointSlice] | None, changes: dict[ObjectKey, EndpointSlice | None]) -> None:
    if snapshot is not None:
        store.replace_slices(v for v in snapshot.values() if v is not None)
    for (namespace, name), endpoint_slice in changes.items():
        store.upsert_slice((namespace or "default", name), endpoint_slice)


def _apply_node(store: ClusterStore, snapshot: dict[ObjectKey, Node] | None, changes: dict[ObjectKey, Node | None]) -> None:
    if snapshot is not None:
        store.set_node(next((n for n in snapshot.values() if n is not None), None))
    for node in changes.values():
        store.set_node(node)


def handlers(
    node_name: str,
    proxy_name: str | None,
    on_invalid: Callable[[Mapping[str, Any], InvalidObject], None] | None = None,
) -> tuple[KindHandler, KindHandler, KindHandler]:
    services, slices, node = watched_kinds(node_name, proxy_name)
    return (
        KindHandler(services, lambda o, r: parse_service(o, proxy_name, report=r), _apply_services, on_invalid=on_invalid),
        KindHandler(slices, lambda o, r: parse_endpoint_slice(o, report=r), _apply_slices, on_invalid=on_invalid),
        KindHandler(node, lambda o, r: parse_node(o, report=r) if _key(o)[1] == node_name else None, _apply_node),
    )


# -- the watch loop (runs in its own thread) --------------------------------------------------


class Watcher:
    """List-then-watch one kind until `stop` is set; deliver snapshots and changes."""

    def __init__(
        self,
        handler: KindHandler,
        transport: Transport,
        notify: Callable[[KindHandler], None],
        stop: threading.Event,
        timing: WatchTiming = WatchTiming(),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        broken: set[str] | None = None,
    ) -> None:
        self.handler = handler
        self.broken = broken if broken is not None else set()  # kinds failing unexpectedly (health)
        self.clock = clock
        self.transport = transport
        self.notify = notify
        self.stop = stop
        self.timing = timing
        self.rng = rng or random.Random()
        self.state = WatchState()
        self.failures = 0
        self.lists = 0  # how many complete lists were delivered (tests and logs)

    @property
    def name(self) -> str:
        return self.handler.kind.name

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.state.resource_version is None:
                    self.list()
                else:
                    self.watch()
            except StatusError as err:
                decision = self.state.on_status(err.code, err.message)
                if isinstance(decision, Reconnect):
                    self.back_off(decision.reason)
                else:
                    log.info("%s: %s; listing again", self.name, decision.reason)
            except Exception as err:
                if not is_transient(err) or self.stop.is_set():
                    if not self.stop.is_set():
                        log.exception("%s watch failed unexpectedly", self.name)
                        self.broken.add(self.name)
                        self.back_off(str(err))
                    continue
                self.back_off(f"{type(err).__name__}: {err}")

    def back_off(self, reason: str) -> None:
        self.failures += 1
        delay = self.timing.backoff.delay(self.failures, self.rng)
        log.warning("%s: %s; retrying in %.1fs (the last good state keeps serving)", self.name, reason, delay)
        self.stop.wait(delay)

    def list(self) -> None:
        items: dict[ObjectKey, Any] = {}
        continue_token: str | None = None
        for _page in range(100_000):  # bounded: a continue token always advances
            body = self.transport.list_page(self.handler.kind, continue_token, self.timing)
            for obj in body.get("items") or ():
                if isinstance(obj, Mapping):
                    key = _key(obj)
                    items[key] = self.handler.value(obj)
            settle()  # the page's objects stay in the store: later collections skip them (heap.py)
            meta = body.get("metadata") or {}
            continue_token = meta.get("continue") or None
            if continue_token is None:
                break
        if self.stop.is_set():
            return
        self.state.listed(body)
        if self.state.resource_version is None:
            raise SourceError(f"list of {self.name} carried no resourceVersion")
        self.lists += 1
        self.failures = 0
        self.broken.discard(self.name)
        log.info("%s: listed %d objects at resourceVersion %s", self.name, len(items), self.state.resource_version)
        if self.handler.pending.snapshot(items):
            self.notify(self.handler)

    def watch(self) -> None:
        assert self.state.resource_version is not None
        timeout = self.timing.server_watch_timeout(self.rng)
        started, seen = self.clock(), 0
        events = self.transport.watch(self.handler.kind, self.state.resource_version, self.timing, timeout)
        with closing(events):
            for event in events:
                if self.stop.is_set():
                    return
                seen += 1
                decision = self.state.on_event(event)
                if not isinstance(decision, (Relist, Reconnect)):
                    self.failures = 0  # the stream works
                if isinstance(decision, (Upsert, Delete)):
                    value = self.handler.value(decision.obj) if isinstance(decision, Upsert) else None
                    if self.handler.pending.change(_key(decision.obj), value):
                        self.notify(self.handler)
                elif isinstance(decision, Skip):
                    log.error("%s: skipping invalid object: %s", self.name, decision.reason)
                elif isinstance(decision, Relist):
                    log.info("%s: %s; listing again", self.name, decision.reason)
                    return
                elif isinstance(decision, Reconnect):
                    self.back_off(decision.reason)
                    return
        if not seen and self.clock() - started < MIN_WATCH_SECONDS:
            raise SourceError("the watch ended at once, without an event")  # back off, never spin
        log.debug("%s: watch ended; watching again from %s", self.name, self.state.resource_version)


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    """(namespace, name) of any object, whatever its metadata's shape ("" for what is missing)."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("", "")
    namespace, name = meta.get("namespace"), meta.get("name")
    return (namespace if isinstance(namespace, str) else "", name if isinstance(name, str) else "")


# -- the asyncio side ----------------------------------------------------------------------------


class KubeSource:
    """Runs the three watchers in threads and applies what they deliver to the store."""

    def __init__(
        self,
        store: ClusterStore,
        on_change: Callable[[], None],
        transport: Transport,
        node_name: str,
        proxy_name: str | None = None,
        timing: WatchTiming = WatchTiming(),
        events: bool = True,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.transport = transport
        self.timing = timing
        reporter = InvalidObjectReporter(transport.post_event, node_name, time.monotonic) if events else None
        self.handlers = handlers(node_name, proxy_name, reporter)
        self.broken: set[str] = set()  # kinds whose watcher failed unexpectedly and has not listed since
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> list[asyncio.Task[None]]:
        """One named task per watched kind; each owns a thread running its `Watcher`."""
        self._loop = asyncio.get_running_loop()
        return [
            asyncio.create_task(self._run_watcher(h), name=f"kube-watch-{h.kind.name}") for h in self.handlers
        ]

    async def run(self) -> None:
        """Watch until cancelled; then stop the threads (bounded) and close the transport.
        After a failure (not a cancel) the transport stays open, so that a supervisor can
        run it again."""
        self._stop = threading.Event()
        tasks = self.start()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                if not task.cancelling():  # a cancelled gather has already cancelled them
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            current = asyncio.current_task()
            if current is None or current.cancelling():
                self.transport.close()

    def apply(self, handler: KindHandler) -> None:
        """On the loop: move a kind's queued changes into the store; nudge a sync if needed."""
        was_synced = self.store.synced
        snapshot, changes = handler.pending.take()
        handler.apply(self.store, snapshot, changes)
        if self.store.has_changes or (self.store.synced and not was_synced):
            self.on_change()

    def _notify(self, handler: KindHandler) -> None:
        """From a watch thread: schedule `apply` on the loop (once per batch)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.apply, handler)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    async def _run_watcher(self, handler: KindHandler) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        watcher = Watcher(handler, self.transport, self._notify, self._stop, self.timing, broken=self.broken)

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def body() -> None:
            try:
                watcher.run()
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:  # loop already closed
                    pass

        thread = threading.Thread(target=body, name=f"kube-watch-{handler.kind.name}", daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        finally:
            self._stop.set()
            self.transport.interrupt()
            try:
                await asyncio.wait_for(asyncio.shield(done), self.timing.connect_timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                log.warning("%s watch thread did not stop in time", handler.kind.name)
            else:
                thread.join(1.0)  # it has only to return: `done` is its last act
