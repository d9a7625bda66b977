"""Cluster source: Services, EndpointSlices and this Node from the API server (list + watch).

Theory of operation:
- One thread per watched kind runs a resumable list-then-watch loop (`Watcher`): list (in
  pages) into a snapshot, then watch from the list's resourceVersion with bookmarks; on 410
  Gone list again; after any other error reconnect with a capped, jittered backoff; when a
  watch ends or falls silent, watch again from the last resourceVersion. The decisions are
  pure (`kube_watch.WatchState`, `Backoff`); this module only does the I/O.
- The `kubernetes` client is synchronous, so it never runs on the event loop. Its raw JSON
  (`_preload_content=False`) is parsed here into API-shaped dicts, the shape
  `pyproxy.model.objects` reads, and into model values, still in the watch thread.
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
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyproxy.model.objects import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    ServiceKey,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from pyproxy.model.store import ClusterStore
from pyproxy.sources.kube_events import InvalidObjectReporter
from pyproxy.sources.kube_watch import (
    Delete,
    Kind,
    ObjectKey,
    Pending,
    Reconnect,
    Relist,
    Upsert,
    WatchState,
    WatchTiming,
    json_lines,
    watched_kinds,
)

log = logging.getLogger("pyproxy.kube")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner without any event counts as a failure


class SourceError(RuntimeError):
    """The API server cannot be reached or answered with an error (retried by the loop)."""


class StatusError(SourceError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- connecting ---------------------------------------------------------------------------


def master_url(master: str) -> str:
    """`host:port` (kube-proxy's --master) or a full URL -> a URL; https unless told."""
    return master if "://" in master else f"https://{master}"


def client_configuration(kubeconfig: str, master: str) -> Any:
    """A kubernetes.client.Configuration from a kubeconfig, an explicit master, or in-cluster.

    `master` overrides the kubeconfig's server (as kube-proxy's --master does). With
    `master` and no kubeconfig, the pod's service-account token and CA are used when
    present, so a DaemonSet can reach the API server directly rather than through the
    `kubernetes` ClusterIP that this very proxy programs.
    """
    from kubernetes import client, config
    from kubernetes.config import kube_config

    cfg = client.Configuration()
    if kubeconfig:
        untyped: Any = kube_config  # the config loaders carry no type hints
        merged = untyped.KubeConfigMerger(kubeconfig)
        if merged.config is None:
            raise config.ConfigException(f"{kubeconfig}: no kubeconfig found")
        loader = untyped.KubeConfigLoader(config_dict=merged.config, config_base_path=None)
        loader.load_and_set(cfg)
        if master:
            # The loader's token-refresh hook copies its host into the configuration before
            # every request (from any watch thread): the override must live in the loader.
            loader.host = master_url(master)
            cfg.host = loader.host
    elif master and os.path.exists(f"{SERVICE_ACCOUNT_DIR}/token"):
        _load_service_account(cfg, master_url(master))
    elif master:
        cfg.host = master_url(master)
    else:
        load_incluster_config: Any = config.load_incluster_config
        load_incluster_config(client_configuration=cfg)
    return cfg


def _load_service_account(cfg: Any, url: str) -> None:
    from kubernetes.config import incluster_config

    loader: Any = incluster_config.InClusterConfigLoader
    host, _, port = url.split("://", 1)[1].rpartition(":")
    loader(
        token_filename=f"{SERVICE_ACCOUNT_DIR}/token",
        cert_filename=f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        environ={"KUBERNETES_SERVICE_HOST": host.strip("[]") or "localhost", "KUBERNETES_SERVICE_PORT": port or "443"},
    ).load_and_set(cfg)


def open_transport(kubeconfig: str, master: str) -> ClientTransport:
    """Connect settings -> a transport (reads files: call it off the event loop)."""
    from kubernetes import client

    try:
        cfg = client_configuration(kubeconfig, master)
    except Exception as err:  # the loaders raise whatever a bad file trips them on (TypeError, KeyError...)
        where = kubeconfig or master or "in-cluster config"
        raise SourceError(f"cannot load API server connection settings ({where}): {err}") from None
    return ClientTransport(client.ApiClient(cfg))


# -- transport: the only code that talks to the API server ---------------------------------


WatchStream = Generator[Any, None, None]


class Transport(Protocol):
    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]: ...

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream: ...

    def interrupt(self) -> None: ...

    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class ClientTransport:
    """List and watch with the official client, reading raw JSON (no model objects)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self._calls: dict[str, Callable[..., Any]] = {
            "Service": core.list_service_for_all_namespaces,
            "EndpointSlice": discovery.list_endpoint_slice_for_all_namespaces,
            "Node": core.list_node,
        }
        self._lock = threading.Lock()
        self._open: set[Any] = set()

    def _call(self, kind: Kind, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        selectors = {"label_selector": kind.label_selector, "field_selector": kind.field_selector}
        try:
            return self._calls[kind.name](
                **{k: v for k, v in selectors.items() if v}, _preload_content=False, **kwargs
            )
        except ApiException as err:
            raise StatusError(int(err.status or 0), _status_message(err.body, str(err.reason))) from None

    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]:
        extra = {"_continue": continue_token} if continue_token else {}
        response = self._call(
            kind, limit=timing.page_size, _request_timeout=(timing.connect_timeout, timing.list_timeout), **extra
        )
        with closing(response):
            body = json.loads(response.data)
        if not isinstance(body, Mapping):
            raise SourceError(f"list of {kind.name}: answer is not an object")
        return body

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream:
        response = self._call(
            kind, watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout, _request_timeout=(timing.connect_timeout, timing.silence_timeout),
        )
        with self._lock:
            self._open.add(response)
        try:
            for line in json_lines(response.stream(64 * 1024, decode_content=True)):
                yield json.loads(line)
        finally:
            with self._lock:
                self._open.discard(response)
            response.close()

    def interrupt(self) -> None:
        """Unblock watches waiting for bytes (called from another thread at shutdown)."""
        with self._lock:
            responses = list(self._open)
        for response in responses:
            try:
                response.shutdown()
            except Exception:  # already closed: nothing to unblock
                pass


    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        # Raw JSON on purpose: the client's Event model turns eventTime into a datetime and
        # writes it back without the microseconds the API server's MicroTime insists on.
        request = self.api_client.param_serialize(
            "POST", "/apis/events.k8s.io/v1/namespaces/{namespace}/events", path_params={"namespace": namespace},
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=dict(body), auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=(5, 5))
        data = response.read()
        if not 200 <= response.status <= 299:
            raise StatusError(int(response.status), _status_message(data, "posting an Event failed"))

    def close(self) -> None:
        self.api_client.close()


def _status_message(body: Any, default: str) -> str:
    try:
        status = json.loads(body) if body else None
    except (TypeError, ValueError):
        return default
    return str(status.get("message") or default) if isinstance(status, Mapping) else default


def is_transient(err: BaseException) -> bool:
    """Errors after which the loop reconnects (anything the network or server can cause)."""
    import urllib3.exceptions

    return isinstance(err, (SourceError, OSError, ValueError, urllib3.exceptions.HTTPError))


# -- per-kind parsing and store updates ------------------------------------------------------


@dataclass
class KindHandler:
    """How one kind's objects become model values, and how they land in the store."""

    kind: Kind
    parse: Callable[[Mapping[str, Any]], Any]
    apply: Callable[[ClusterStore, dict[ObjectKey, Any] | None, dict[ObjectKey, Any]], None]
    pending: Pending[ObjectKey, Any] = field(default_factory=Pending)
    on_invalid: Callable[[Mapping[str, Any], InvalidObject], None] | None = None

    def value(self, obj: Mapping[str, Any]) -> Any:
        """The model value of an object, or None when it is not ours or invalid (logged)."""
        try:
            return self.parse(obj)
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
        KindHandler(services, lambda o: parse_service(o, proxy_name), _apply_services, on_invalid=on_invalid),
        KindHandler(slices, parse_endpoint_slice, _apply_slices, on_invalid=on_invalid),
        KindHandler(node, lambda o: parse_node(o) if (o.get("metadata") or {}).get("name") == node_name else None, _apply_node),
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
    ) -> None:
        self.handler = handler
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
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


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
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> list[asyncio.Task[None]]:
        """One named task per watched kind; each owns a thread running its `Watcher`."""
        self._loop = asyncio.get_running_loop()
        return [
            asyncio.create_task(self._run_watcher(h), name=f"kube-watch-{h.kind.name}") for h in self.handlers
        ]

    async def run(self) -> None:
        """Watch until cancelled; then stop the threads (bounded) and close the transport."""
        tasks = self.start()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                if not task.cancelling():  # a cancelled gather has already cancelled them
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
        watcher = Watcher(handler, self.transport, self._notify, self._stop, self.timing)

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
