"""Pure views: the proxy's model and counters, as JSON rows, filtered and paged.

Rules kept here (no I/O, no clock: `now` is passed in, on the relays' monotonic clock):
- A services row is one service port: its frontends as served (ClusterIP, NodePort with
  the node addresses it is served on, externalIPs, load-balancer IPs), its traffic
  policies and affinity settings, and every endpoint with its conditions, its node, and
  whether it is in the cluster set and in the local set (SPEC.md §2).
- An affinity row is one pin: client IP -> endpoint, with `age` (seconds since the pin was
  last refreshed, by the client's last new connection) and `expiresIn` (seconds left of
  `timeoutSeconds`). Stale pins are left out: the next connection would not use them.
- A connection row is one open TCP pair or UDP flow: client, frontend, endpoint, bytes each
  way, `age`, `idle` and a state: `connecting` (no endpoint yet), `draining` (its endpoint
  has left the service port's usable set, or the proxy is shutting down; it carries on
  until it ends), `half-closed` (one side sent EOF), else `open`.
- Every list is sorted by a fixed key per kind (namespace, Service, port, then client IP
  in numeric order), so pages from several workers merge into one sorted list (`merge`)
  and a page never depends on dict order. Affinity and connection rows are built only for
  the first offset+limit matches (`first`): the pass over a big table is cheap, the rows
  are not.
- A query names the filters (namespace, service, client IP) and the page (offset, limit);
  every bad value is a `QueryError` that names the parameter and the reason.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyproxy.dataplane.stats import ConnectionInfo
from pyproxy.model.endpoints import Endpoint
from pyproxy.model.family import join_host_port, split_host_port
from pyproxy.model.objects import EndpointSlice, Service, ServiceKey, ServicePortName
from pyproxy.model.table import PortState, Route

Row = dict[str, Any]
T = TypeVar("T")
Frontend = tuple[str, str, int]
KINDS = ("services", "endpoints", "affinity", "connections")
DEFAULT_LIMIT = 500
MAX_LIMIT = 10000


class QueryError(ValueError):
    """A query parameter that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Query:
    namespace: str | None = None
    service: str | None = None  # a Service name, or namespace/name
    client: str | None = None  # a client IP
    offset: int = 0
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True)
class AffinityView:
    """One service port's affinity table, read at one instant."""

    timeout: int
    entries: tuple[tuple[str, tuple[str, int], float], ...]  # (client IP, endpoint, last use)


def parse_query(params: Mapping[str, str]) -> Query:
    """Query parameters as given in the URL; unknown parameters are errors."""
    known = {"namespace", "service", "client", "offset", "limit"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise QueryError(f"{unknown[0]}: unknown parameter (known: {', '.join(sorted(known))})")
    return Query(
        namespace=params.get("namespace") or None,
        service=params.get("service") or None,
        client=_client(params.get("client")),
        offset=_count(params, "offset", 0, None),
        limit=_count(params, "limit", DEFAULT_LIMIT, MAX_LIMIT),
    )


def _client(text: str | None) -> str | None:
    """A client IP, canonical so that it matches the table's text (`FD00::0001` is fd00::1)."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise QueryError(f"client: {text!r} is not an IP address") from None


def _count(params: Mapping[str, str], name: str, default: int, cap: int | None) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise QueryError(f"{name}: {text!r} is not a non-negative integer")
    value = int(text)
    if cap is not None and value > cap:
        raise QueryError(f"{name}: {value} is above the maximum of {cap}")
    return value


def query_params(query: Query) -> dict[str, str]:
    """The inverse of `parse_query` (what a client or an aggregating worker sends)."""
    params = {"namespace": query.namespace, "service": query.service, "client": query.client}
    out = {k: v for k, v in params.items() if v}
    out["offset"], out["limit"] = str(query.offset), str(query.limit)
    return out


# formatting


def address(value: tuple[str, int]) -> str:
    """`ip:port`, `[ip]:port` for IPv6."""
    return join_host_port(value[0], value[1])


def _seconds(value: float) -> float:
    return round(max(0.0, value), 3)


# services and endpoints


def service_rows(
    services: Mapping[ServiceKey, Service],
    slices_of: Callable[[ServiceKey], Iterable[EndpointSlice]],
    ports: Mapping[ServicePortName, PortState],
    routes: Mapping[Frontend, Route],
) -> list[Row]:
    """One row per service port the table serves (see module doc), sorted."""
    served: dict[ServicePortName, list[tuple[Frontend, bool]]] = {}
    for frontend, route in routes.items():
        served.setdefault(route.port.name, []).append((frontend, route.external))
    rows = []
    for name, state in ports.items():
        service = services.get(name.service)
        if service is None:
            continue
        nodes = _endpoint_nodes(slices_of(name.service))
        rows.append(_service_row(service, state, sorted(served.get(name, [])), nodes))
    return sorted(rows, key=sort_key("services"))


def _endpoint_nodes(slices: Iterable[EndpointSlice]) -> dict[str, str | None]:
    nodes: dict[str, str | None] = {}
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.endpoints:
            if nodes.get(endpoint.ip) is None:
                nodes[endpoint.ip] = endpoint.node_name
    return nodes


def _service_row(
    service: Service, state: PortState, frontends: list[tuple[Frontend, bool]], nodes: Mapping[str, str | None]
) -> Row:
    name = state.name
    spec = next((p for p in service.ports if p.name == name), None)
    number = spec.port if spec else None
    node_port = spec.node_port if spec else None
    by_ip = {ip for (ip, _, port), _ in frontends if port == number}
    node_addresses = sorted(ip for (ip, _, port), external in frontends
                            if external and port == node_port and ip not in service.external_ips
                            and ip not in service.load_balancer_ips)
    return {
        "namespace": name.service.namespace,
        "service": name.service.name,
        "portName": name.port_name,
        "protocol": name.protocol,
        "port": number,
        "type": service.type,
        "clusterIPs": [ip for ip in service.cluster_ips if ip in by_ip],
        "nodePort": node_port,
        "nodePortAddresses": node_addresses,
        "externalIPs": [ip for ip in service.external_ips if ip in by_ip],
        "loadBalancerIPs": [ip for ip in service.load_balancer_ips if ip in by_ip],
        "internalTrafficPolicy": "Local" if state.internal_local else "Cluster",
        "externalTrafficPolicy": "Local" if state.external_local else "Cluster",
        "sessionAffinity": "None" if state.affinity_timeout is None else "ClientIP",
        "affinityTimeoutSeconds": state.affinity_timeout,
        "endpoints": [_endpoint_row(e, state, nodes) for e in state.endpoints.all],
    }


def _endpoint_row(endpoint: Endpoint, state: PortState, nodes: Mapping[str, str | None]) -> Row:
    return {
        "address": str(endpoint),
        "ready": endpoint.ready,
        "serving": endpoint.serving,
        "terminating": endpoint.terminating,
        "node": nodes.get(endpoint.ip),
        "isLocal": endpoint.is_local,
        "inClusterSet": endpoint in state.endpoints.cluster,
        "inLocalSet": endpoint in state.endpoints.local,
    }


def endpoint_rows(services: Sequence[Row]) -> list[Row]:
    """The services rows flattened: one row per (service port, endpoint)."""
    rows = []
    for service in services:
        head = {k: service[k] for k in ("namespace", "service", "portName", "protocol", "port")}
        rows += [{**head, **endpoint} for endpoint in service["endpoints"]]
    return sorted(rows, key=sort_key("endpoints"))


# affinity


def port_numbers(services: Mapping[ServiceKey, Service]) -> dict[ServicePortName, int]:
    return {p.name: p.port for service in services.values() for p in service.ports}


Selection = tuple[list[Row], int]  # (the first rows, sorted; how many matched in all)


def first(items: Iterable[T], keep: Callable[[T], bool], key: Callable[[T], Any], count: int | None) -> tuple[list[T], int]:
    """The `count` smallest items by `key` among those `keep` accepts (all if None), and how many it accepted.

    Big tables (a flood of clients, 100k connections) cost one pass and a bounded heap:
    rows are only built for what is shown."""
    matched = [item for item in items if keep(item)]
    if count is None or count >= len(matched):
        return sorted(matched, key=key), len(matched)
    return heapq.nsmallest(count, matched, key=key), len(matched)


def affinity_rows(
    tables: Mapping[ServicePortName, AffinityView], now: float, worker: int = 0,
    numbers: Mapping[ServicePortName, int] | None = None, query: Query | None = None, count: int | None = None,
) -> Selection:
    """Fresh pins that match `query`, sorted: the first `count` as rows, and how many matched."""
    q = query or Query()
    pins = ((name, view, entry) for name, view in tables.items() if wanted(q, name)
            for entry in view.entries)

    def keep(pin: tuple[ServicePortName, AffinityView, tuple[str, tuple[str, int], float]]) -> bool:
        _, view, (client, _, last_used) = pin
        return now - last_used <= view.timeout and (not q.client or client == q.client)

    chosen, total = first(pins, keep, lambda pin: (*_port_key(pin[0]), ip_key(pin[2][0]), worker), count)
    rows = [{
        **_port_fields(name, numbers),
        "client": client,
        "endpoint": address(endpoint),
        "age": _seconds(now - last_used),
        "expiresIn": _seconds(view.timeout - (now - last_used)),
        "timeoutSeconds": view.timeout,
        "worker": worker,
    } for name, view, (client, endpoint, last_used) in chosen]
    return rows, total


def _port_fields(name: ServicePortName, numbers: Mapping[ServicePortName, int] | None) -> Row:
    return {"namespace": name.service.namespace, "service": name.service.name,
            "portName": name.port_name, "protocol": name.protocol, "port": (numbers or {}).get(name)}


def _port_key(name: ServicePortName) -> tuple[str, str, str, str]:
    return (name.service.namespace, name.service.name, name.port_name, name.protocol)


# connections


def connection_state(info: ConnectionInfo, ports: Mapping[ServicePortName, PortState], shutting_down: bool) -> str:
    if info.endpoint is None:
        return "connecting"
    state = ports.get(info.port)
    usable = {e.address for e in state.endpoints.cluster + state.endpoints.local} if state else set()
    if shutting_down or info.endpoint not in usable:
        return "draining"
    if info.client_done or info.endpoint_done:
        return "half-closed"
    return "open"


def connection_rows(
    connections: Iterable[ConnectionInfo],
    ports: Mapping[ServicePortName, PortState],
    now: float,
    shutting_down: bool = False,
    worker: int = 0,
    numbers: Mapping[ServicePortName, int] | None = None,
    query: Query | None = None,
    count: int | None = None,
) -> Selection:
    """Connections that match `query`, sorted: the first `count` as rows, and how many matched."""
    q = query or Query()

    def keep(info: ConnectionInfo) -> bool:
        return wanted(q, info.port) and (not q.client or info.client[0] == q.client)

    chosen, total = first(connections, keep,
                          lambda i: (*_port_key(i.port), ip_key(i.client[0]), i.client[1], worker), count)
    rows = [
        {
            **_port_fields(info.port, numbers),
            "protocol": info.protocol,
            "client": address(info.client),
            "frontend": address(info.frontend),
            "endpoint": address(info.endpoint) if info.endpoint else None,
            "bytesToEndpoint": info.bytes_in,
            "bytesToClient": info.bytes_out,
            "age": _seconds(now - info.started),
            "idle": _seconds(now - info.last_active),
            "state": connection_state(info, ports, shutting_down),
            "worker": worker,
        }
        for info in chosen
    ]
    return rows, total


# filters, sorting, paging, merging


def ip_key(ip: str) -> bytes:
    """Numeric order of addresses (10.0.0.9 before 10.0.0.10), IPv4 before IPv6."""
    try:
        return b"4" + socket.inet_aton(ip)
    except OSError:
        pass
    try:
        return b"6" + socket.inet_pton(socket.AF_INET6, ip.split("%")[0])
    except OSError:
        return b""


def _split(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError:
        return text, -1


def sort_key(kind: str) -> Callable[[Row], tuple[Any, ...]]:
    def base(row: Row) -> tuple[Any, ...]:
        return (row["namespace"], row["service"], row["portName"], row["protocol"])

    if kind == "services":
        return base
    if kind == "endpoints":
        return lambda r: (*base(r), ip_key(_split(r["address"])[0]), _split(r["address"])[1])
    if kind == "affinity":
        return lambda r: (*base(r), ip_key(r["client"]), r["worker"])
    if kind == "connections":
        return lambda r: (*base(r), ip_key(_split(r["client"])[0]), _split(r["client"])[1], r["worker"])
    raise ValueError(f"unknown kind {kind!r}")


def wanted(query: Query, name: ServicePortName) -> bool:
    """Whether a service port passes the query's namespace and service filters."""
    if query.namespace and name.service.namespace != query.namespace:
        return False
    if query.service:
        namespace, _, service = query.service.rpartition("/")
        if name.service.name != service or (namespace and name.service.namespace != namespace):
            return False
    return True


def matches(row: Row, query: Query) -> bool:
    name = ServicePortName(ServiceKey(row["namespace"], row["service"]), row["portName"], row["protocol"])
    if not wanted(query, name):
        return False
    if query.client and "client" in row:
        if row["client"].rsplit(":", 1)[0] != query.client and row["client"] != query.client:
            return False
    return True


def select(kind: str, rows: Sequence[Row], query: Query, workers: int = 1, errors: Sequence[str] = ()) -> Row:
    """The page of `rows` (already sorted) that `query` asks for, with the total that matched."""
    chosen = [r for r in rows if matches(r, query)]
    return page(kind, chosen, len(chosen), query, workers, errors)


def page(kind: str, rows: Sequence[Row], total: int, query: Query, workers: int, errors: Sequence[str]) -> Row:
    items = list(rows[query.offset:query.offset + query.limit])
    following = query.offset + len(items)
    return {
        "kind": kind,
        "workers": workers,
        "total": total,
        "offset": query.offset,
        "limit": query.limit,
        "next": following if following < total else None,
        "items": items,
        **({"errors": list(errors)} if errors else {}),
    }


def merge(kind: str, pages: Sequence[Row], query: Query, workers: int, errors: Sequence[str] = ()) -> Row:
    """One page out of several workers' pages, each asked for offset 0 and limit offset+limit."""
    rows = sorted((item for p in pages for item in p["items"]), key=sort_key(kind))
    total = sum(int(p["total"]) for p in pages)
    return page(kind, rows, total, query, workers, [*errors, *(e for p in pages for e in p.get("errors", ()))])
