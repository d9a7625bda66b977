"""The health HTTP servers: the thin I/O edge around `pyproxy.observe.health`.

Rules kept here:
- `/healthz` and `/livez` answer from the proxy's state read at request time; any other
  path is 404.
- One health check server per wanted `healthCheckNodePort`, answering every path and
  method. After each sync `update()` records the local endpoint counts at once (answers
  change with the sync that applied them) and nudges `run()`, which opens and closes
  servers to match the Services.
- A port that cannot be bound is logged naming the Service and tried again after the next
  sync; it never stops the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pyproxy.model.objects import Service, ServiceKey, ServicePortName
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import PortState
from pyproxy.observe import health
from pyproxy.observe.health import ProxyState, Response
from pyproxy.observe.http import Handler, start_http
from pyproxy.sync import SyncRunner

log = logging.getLogger("pyproxy.health")

Answered = Callable[[str, int], None]  # (endpoint "healthz"/"livez", status code)


class Listening(Protocol):
    """What is kept of an open server (an `asyncio.Server`, or a test's fake)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


Listen = Callable[[str, int, Handler], Awaitable[Listening]]


def proxy_state_reader(
    runner: SyncRunner,
    store: ClusterStore,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    down: Callable[[], tuple[str, ...]] = tuple,
) -> Callable[[], ProxyState]:
    """Reads the proxy's health inputs at request time (`clock` must be the runner's)."""
    started = clock()

    def read() -> ProxyState:
        return ProxyState(
            pending_since=health.effective_pending(runner.oldest_unapplied, store.synced, started),
            last_success=runner.last_success,
            node=store.node,
            timeout=timeout,
            epoch_offset=wall_clock() - clock(),
            down=down(),
        )

    return read


@dataclass
class _Check:
    service: ServiceKey
    server: Listening


class HealthServers:
    def __init__(
        self,
        proxy_state: Callable[[], ProxyState],
        clock: Callable[[], float] = time.monotonic,
        answered: Answered = lambda *_: None,
        check_host: str = "0.0.0.0",
        listen: Listen = start_http,
    ) -> None:
        self.proxy_state = proxy_state
        self.clock = clock
        self.answered = answered
        self.check_host = check_host
        self.listen = listen
        self.proxy_server: Listening | None = None
        self.checks: dict[int, _Check] = {}
        self.counts: dict[ServiceKey, int] = {}
        self.wanted: dict[int, ServiceKey] = {}
        self._failed: set[tuple[int, ServiceKey]] = set()
        self._nudge = asyncio.Event()

    # the proxy's own health

    async def start_proxy_health(self, host: str, port: int) -> None:
        self.proxy_server = await self.listen(host, port, self.answer_proxy)
        log.info("serving /healthz and /livez on %s:%d", host or "0.0.0.0", port)

    def answer_proxy(self, method: str, path: str) -> Response:
        state = self.proxy_state()
        if path == "/healthz":
            response = health.healthz(self.clock(), state)
        elif path == "/livez":
            response = health.livez(self.clock(), state)
        else:
            return Response(404, b"404 page not found\n", (("Content-Type", "text/plain; charset=utf-8"),))
        self.answered(path.lstrip("/"), response.status)
        return response

    # per-Service health checks

    def update(self, services: Iterable[Service], ports: Mapping[ServicePortName, PortState],
               ports_of: Callable[[ServiceKey], Iterable[ServicePortName]] | None = None) -> None:
        """After a sync: new endpoint counts now, server changes soon (by `run()`). With
        `ports_of` (a Service's port names), only the checked Services' ports are read."""
        plan = health.desired_health_checks(services)
        for loser, port, owner in plan.conflicts:
            log.error("Service %s: healthCheckNodePort %d is already used by Service %s; not serving it",
                      loser, port, owner)
        checked = set(plan.wanted.values())
        if ports_of is not None:
            ports = {name: ports[name] for key in checked for name in ports_of(key) if name in ports}
        self.counts = health.local_endpoint_counts(ports, only=checked)
        self.wanted = plan.wanted
        self._nudge.set()

    def answer_check(self, service: ServiceKey) -> Response:
        state = self.proxy_state()
        healthy = health.proxy_healthy(self.clock(), state.pending_since, state.timeout)
        return health.service_health(service, self.counts.get(service, 0), healthy)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile the open health check servers whenever `update()` nudges."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(self._nudge.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if stop.is_set():
                    return
                self._nudge.clear()
                await self.reconcile()
        finally:
            stopper.cancel()

    async def reconcile(self) -> None:
        open_now = {port: check.service for port, check in self.checks.items()}
        close, start = health.reconcile(self.wanted, open_now)
        for port in close:
            check = self.checks.pop(port)
            log.info("closing health check for Service %s on port %d", check.service, port)
            await _close(check.server)
        for port, service in start:
            await self._open(port, service)

    async def _open(self, port: int, service: ServiceKey) -> None:
        def answer(_method: str, _path: str) -> Response:
            return self.answer_check(service)

        try:
            server = await self.listen(self.check_host, port, answer)
        except OSError as err:
            level = logging.DEBUG if (port, service) in self._failed else logging.ERROR
            log.log(level, "Service %s: cannot open health check node port %d (%s); retrying after the next sync",
                    service, port, err.strerror or err)
            self._failed.add((port, service))
            return
        self._failed.discard((port, service))
        self.checks[port] = _Check(service, server)
        log.info("serving health check for Service %s on port %d", service, port)

    async def close(self) -> None:
        servers: list[Listening] = [check.server for check in self.checks.values()]
        if self.proxy_server is not None:
            servers.append(self.proxy_server)
        self.checks.clear()
        self.proxy_server = None
        for server in servers:
            await _close(server)


async def _close(server: Listening) -> None:
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), 5.0)
    except TimeoutError:
        log.warning("a health server did not close within 5s")
