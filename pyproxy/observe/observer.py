"""Health and metrics for one proxy, assembled: what `ProxyApp` starts, feeds and stops.

Rules kept here:
- `synced()` is called after every successful sync: it records the sync metrics and the
  health checks' endpoint counts before returning.
- The /healthz+/livez and /metrics listeners are bound at start; an address that cannot be
  bound (an old kube-proxy still holding it, say) is logged and retried every few seconds
  rather than stopping the proxy. An empty bind address turns that server off.
- The metrics address also serves the debug API (`pyproxy/observe/inspect_api.py`) and, as
  kube-proxy's does, `/configz`: the effective configuration as JSON, under its group
  name (`{"pyproxy.io": {"apiVersion": ..., "kind": "PyProxyConfiguration", ...}}`), to
  any method; and `/proxyMode`, where kube-proxy names its mode (`iptables`, `ipvs`,
  `nftables`): pyproxy answers `userspace`, the name kube-proxy gave its own proxying
  process before it removed that mode (tools and Kubernetes' e2e read it from here).
- A successor takes over every listener open here (`listening()`); the servers it opens
  take a handed-over socket for their port when there is one (`take_socket`).
- With `--workers N`, worker 0 serves all of the above; every other worker serves only its
  own debug view and /metrics, on its worker socket, for worker 0 to aggregate (it must
  not open health check node ports: worker 0 has them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST

from pyproxy.config import GROUP, ProxyConfig, config_document, split_host_port
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.workers import WorkerRole
from pyproxy.inspect.reader import ProxyReader
from pyproxy.observe.inspect_api import InspectApi, serve_worker_socket, worker_socket_name
from pyproxy.model.table import ServiceTable
from pyproxy.observe.health import Response
from pyproxy.observe.http import serve_http, start_http
from pyproxy.observe.metrics import CountingStore, ProxyMetrics
from pyproxy.observe.servers import HealthServers, proxy_state_reader
from pyproxy.sync import SyncRunner

log = logging.getLogger("pyproxy.observe")
BIND_RETRY = 5.0


class Observer:
    def __init__(
        self, config: ProxyConfig, store: CountingStore, table: ServiceTable, stats: DataplaneStats, runner: SyncRunner,
        reader: ProxyReader, worker: WorkerRole | None = None,
        down: Callable[[], tuple[str, ...]] = tuple,
        take_socket: Callable[[int], socket.socket | None] = lambda _: None,
        relay: str = "",
    ) -> None:
        self.config = config
        self.store = store
        self.table = table
        self.worker = worker or WorkerRole()
        self.metrics = ProxyMetrics(store, table, stats, relay=relay)
        peers = [worker_socket_name(self.worker.group, i) for i in range(1, self.worker.count)]
        self.api = InspectApi(
            reader,
            self.metrics.exposition,
            metrics_type=CONTENT_TYPE_LATEST,
            peers=peers if self.worker.index == 0 else (),
            workers=self.worker.count,
            debug=config.debugAPI,
        )
        self.health = HealthServers(
            proxy_state_reader(runner, store, timeout=2 * config.syncPeriod, clock=runner.clock, down=down),
            clock=runner.clock,
            answered=self.metrics.answered,
            listen=lambda host, port, handler: start_http(host, port, handler, sock=take_socket(port)),
        )
        self.take_socket = take_socket
        self.metrics_server: asyncio.Server | None = None

    def synced(self, seconds: float) -> None:
        self.metrics.synced(seconds)
        self.health.update(self.table.health_checked.values(), self.table.ports, self.table.ports_of)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`: bind both listeners (retrying), reconcile health checks."""
        if self.worker.index != 0:
            if self.config.metricsBindAddress:  # worker 0 has someone to aggregate for
                await self._serve_worker_socket(stop)
            return
        tasks = [asyncio.create_task(self.health.run(stop), name="health-checks")]
        if self.config.healthzBindAddress:
            host, port = split_host_port(self.config.healthzBindAddress, "healthzBindAddress")
            tasks.append(asyncio.create_task(
                _bind_until(stop, "healthz", lambda: self.health.start_proxy_health(host, port)), name="healthz-bind"))
        if self.config.metricsBindAddress:
            tasks.append(asyncio.create_task(_bind_until(stop, "metrics", self._start_metrics), name="metrics-bind"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def _start_metrics(self) -> None:
        host, port = split_host_port(self.config.metricsBindAddress, "metricsBindAddress")
        self.metrics_server = await serve_http(host, port, self.answer_metrics, sock=self.take_socket(port))
        log.info("serving /metrics, /configz, /proxyMode%s on %s:%d", " and /debug" if self.config.debugAPI else "", host, port)

    async def answer_metrics(self, method: str, path: str, query: Mapping[str, str]) -> Response:
        if path == "/configz":
            return configz(self.config)
        if path == "/proxyMode":
            return proxy_mode()
        return await self.api.answer(method, path, query)

    async def _serve_worker_socket(self, stop: asyncio.Event) -> None:
        name = worker_socket_name(self.worker.group, self.worker.index)
        try:
            self.metrics_server = await serve_worker_socket(name, self.api)
        except OSError as err:
            log.error("worker %d: cannot serve its debug view and metrics: %s", self.worker.index, err)
            return
        try:
            await stop.wait()
        finally:
            await self.close()

    def listening(self) -> list[tuple[int, int]]:
        """(port, descriptor) of every HTTP listener open now: what a successor takes over."""
        servers: list[object] = [self.metrics_server, self.health.proxy_server,
                                 *(check.server for check in self.health.checks.values())]
        out: list[tuple[int, int]] = []
        for server in servers:
            for sock in getattr(server, "sockets", ()) or ():
                if sock.family in (socket.AF_INET, socket.AF_INET6):  # a worker's unix debug socket is its own
                    out.append((sock.getsockname()[1], sock.fileno()))
        return out

    async def close(self) -> None:
        await self.health.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            await self.metrics_server.wait_closed()
            self.metrics_server = None


async def _bind_until(stop: asyncio.Event, what: str, start: Callable[[], Awaitable[None]]) -> None:
    while not stop.is_set():
        try:
            await start()
            return
        except OSError as err:
            log.error("cannot serve %s: %s; retrying in %.0fs", what, err, BIND_RETRY)
        try:
            await asyncio.wait_for(stop.wait(), BIND_RETRY)
        except TimeoutError:
            pass


PROXY_MODE = "userspace"


def proxy_mode() -> Response:
    """kube-proxy's /proxyMode: the mode's name, as plain text."""
    return Response(200, PROXY_MODE.encode(), (("Content-Type", "text/plain; charset=utf-8"),
                                               ("X-Content-Type-Options", "nosniff")))


def configz(config: ProxyConfig) -> Response:
    """kube-proxy's /configz: every registered configuration by its group name, as JSON."""
    body = json.dumps({GROUP: config_document(config)}, indent=1).encode() + b"\n"
    return Response(200, body, (("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")))
