"""Health decisions, pure: proxy /healthz and /livez, and the per-Service health check.

Rules kept here (SPEC.md §6, kube-proxy's proxier health and service health servers):
- The proxy is healthy unless a queued change has waited `timeout` seconds (2 × syncPeriod)
  without being applied. Starting up, or idle with nothing queued, is healthy: health means
  "the data plane is not stale", not "something happened lately".
- Before the first complete list of Services and EndpointSlices, the proxy counts as having
  had a change queued since it started: one that never gets its input turns unhealthy.
- `/healthz` is also unhealthy while a supervised task (a source, the sync runner, a
  server) has failed and is not working again (`down`, named in the body).
- `/healthz` is also unhealthy while the node is being deleted or carries the
  ToBeDeletedByClusterAutoscaler taint, so that load balancers drain it; `/livez` ignores the
  node (a draining node's proxy must not be restarted for it). Until the Node is known it
  counts as eligible.
- A healthy answer reports `lastUpdated` = `currentTime` (kube-proxy keeps that for
  compatibility); an unhealthy one reports the last successful sync.
- A Service health check answers 200 iff the Service has at least one distinct local, ready,
  non-terminating endpoint IP and the proxy is healthy (node ignored, as kube-proxy does).
- Only `type: LoadBalancer` + `externalTrafficPolicy: Local` Services with a
  `healthCheckNodePort` get one; two Services claiming one port: the first by name wins.

Times: `now`, `pending_since` and `last_success` share one monotonic clock; `epoch_offset`
(wall clock minus that clock) turns them into the wall-clock stamps the JSON shows.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.model.family import Family
from pyproxy.model.objects import Node, Service, ServiceKey, ServicePortName
from pyproxy.model.table import PortState

JSON_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "application/json"),
    ("X-Content-Type-Options", "nosniff"),
)
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = field(default=())

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


@dataclass(frozen=True)
class ProxyState:
    """What proxy health is decided from, read from the sync runner and the store."""

    pending_since: float | None
    last_success: float | None
    node: Node | None
    timeout: float
    epoch_offset: float = 0.0
    down: tuple[str, ...] = ()  # supervised tasks failed and not working again


def effective_pending(pending_since: float | None, synced: bool, started: float) -> float | None:
    """Unsynced input counts as a change queued since start (see module doc)."""
    if synced:
        return pending_since
    return started if pending_since is None else min(pending_since, started)


def proxy_healthy(now: float, pending_since: float | None, timeout: float) -> bool:
    return pending_since is None or now - pending_since < timeout


def node_eligible(node: Node | None) -> bool:
    return node is None or not (node.being_deleted or node.autoscaler_tainted)


def wall_time(monotonic: float | None, epoch_offset: float) -> str:
    """RFC 3339 UTC with microseconds; the zero time when there is none yet."""
    if monotonic is None:
        return ZERO_TIME
    stamp = datetime.datetime.fromtimestamp(monotonic + epoch_offset, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def healthz(now: float, state: ProxyState) -> Response:
    eligible = node_eligible(state.node)
    healthy = proxy_healthy(now, state.pending_since, state.timeout) and eligible and not state.down
    extra: dict[str, object] = {"nodeEligible": eligible}
    if state.down:
        extra["down"] = list(state.down)
    return _proxy_response(now, state, healthy, extra)


def livez(now: float, state: ProxyState) -> Response:
    healthy = proxy_healthy(now, state.pending_since, state.timeout)
    return _proxy_response(now, state, healthy, {})


def _proxy_response(now: float, state: ProxyState, healthy: bool, extra: dict[str, object]) -> Response:
    last = now if healthy else state.last_success
    body = {
        "lastUpdated": wall_time(last, state.epoch_offset),
        "currentTime": wall_time(now, state.epoch_offset),
        **extra,
    }
    return Response(200 if healthy else 503, json.dumps(body).encode(), JSON_HEADERS)


def service_health(service: ServiceKey, local_endpoints: int, proxy_is_healthy: bool) -> Response:
    body = {
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_is_healthy,
    }
    status = 200 if local_endpoints > 0 and proxy_is_healthy else 503
    headers = JSON_HEADERS + (("X-Load-Balancing-Endpoint-Weight", str(local_endpoints)),)
    return Response(status, json.dumps(body).encode(), headers)


def local_endpoint_counts(
    ports: Mapping[ServicePortName, PortState], only: Collection[ServiceKey] | None = None
) -> dict[ServiceKey, int]:
    """Distinct local, ready, non-terminating endpoint IPs per Service, over all its ports.

    Dual-stack: a pod has an address of each family, so the IPs are counted per family and
    the larger count is the Service's (kube-proxy's health check of each family counts that
    family's endpoints): a pod is one endpoint, not two."""
    ips: dict[ServiceKey, dict[Family, set[str]]] = {}
    for name, state in ports.items():
        if only is not None and name.service not in only:
            continue
        found = ips.setdefault(name.service, {family: set() for family in Family})
        for e in state.endpoints.all:
            if e.is_local and e.ready and not e.terminating:
                found[e.family].add(e.ip)
    return {key: max(len(f) for f in found.values()) for key, found in ips.items()}


@dataclass(frozen=True)
class HealthCheckPlan:
    wanted: dict[int, ServiceKey]  # healthCheckNodePort -> Service
    conflicts: tuple[tuple[ServiceKey, int, ServiceKey], ...]  # (loser, port, owner)


def desired_health_checks(services: Iterable[Service]) -> HealthCheckPlan:
    """Which health check node ports should be open, and for which Service."""
    wanted: dict[int, ServiceKey] = {}
    conflicts: list[tuple[ServiceKey, int, ServiceKey]] = []
    candidates = [s for s in services
                  if s.health_check_node_port is not None and s.type == "LoadBalancer" and s.external_local]
    for service in sorted(candidates, key=lambda s: s.key):
        port = service.health_check_node_port
        assert port is not None
        owner = wanted.get(port)
        if owner is None:
            wanted[port] = service.key
        else:
            conflicts.append((service.key, port, owner))
    return HealthCheckPlan(wanted, tuple(conflicts))


def reconcile(
    wanted: Mapping[int, ServiceKey], open_now: Mapping[int, ServiceKey]
) -> tuple[list[int], list[tuple[int, ServiceKey]]]:
    """(ports to close, (port, Service) to open): a port that changes owner is closed and reopened."""
    close = sorted(port for port, key in open_now.items() if wanted.get(port) != key)
    start = sorted((port, key) for port, key in wanted.items() if open_now.get(port) != key)
    return close, start
