"""Health and metrics for one proxy, assembled: what `ProxyApp` starts, feeds and stops.

Rules kept here:
- `synced()` is called after every successful sync: it records the sync metrics and the
  health checks' endpoint counts before returning.
- The /healthz+/livez and /metrics listeners are bound at start; an address that cannot be
  bound (an old kube-proxy still holding it, say) is logged and retried every few seconds
  rather than stopping the proxy. An empty bind address turns that server off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pyproxy.config import ProxyConfig, split_host_port
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.model.table import ServiceTable
from pyproxy.observe.http import start_http
from pyproxy.observe.metrics import CountingStore, ProxyMetrics
from pyproxy.observe.servers import HealthServers, proxy_state_reader
from pyproxy.sync import SyncRunner

log = logging.getLogger("pyproxy.observe")
BIND_RETRY = 5.0


class Observer:
    def __init__(
        self, config: ProxyConfig, store: CountingStore, table: ServiceTable, stats: DataplaneStats, runner: SyncRunner
    ) -> None:
        self.config = config
        self.store = store
        self.table = table
        self.metrics = ProxyMetrics(store, table, stats)
        self.health = HealthServers(
            proxy_state_reader(runner, store, timeout=2 * config.syncPeriod, clock=runner.clock),
            clock=runner.clock,
            answered=self.metrics.answered,
        )
        self.metrics_server: asyncio.Server | None = None

    def synced(self, seconds: float) -> None:
        self.metrics.synced(seconds)
        self.health.update(self.store.services.values(), self.table.ports)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`: bind both listeners (retrying), reconcile health checks."""
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
        self.metrics_server = await start_http(host, port, self.metrics.answer)
        log.info("serving /metrics on %s:%d", host, port)

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
