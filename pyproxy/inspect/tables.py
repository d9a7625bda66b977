"""kubectl-like tables of the inspection API's JSON pages (pure: rows in, text out).

Rules kept here:
- Column headers are upper case, columns are left-aligned and separated by three spaces,
  as `kubectl get` prints them; an empty list prints `No resources found.`-style text.
- `wide` adds columns and never removes one, so scripts that cut columns keep working.
- Durations print as kubectl ages (`42s`, `3m12s`, `2h5m`, `3d4h`); bytes as exact numbers.
- A page that is not the whole list says so on a last line, with the offset to go on from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]


def age(seconds: float | None) -> str:
    if seconds is None:
        return "<none>"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m" if s % 3600 >= 60 else f"{s // 3600}h"
    return f"{s // 86400}d{(s % 86400) // 3600}h" if s % 86400 >= 3600 else f"{s // 86400}d"


def _join(values: Sequence[str]) -> str:
    return ",".join(values) if values else "<none>"


def _port(row: Row) -> str:
    name = row["portName"]
    number = row.get("port")
    head = f"{number}/{row['protocol']}" if number is not None else row["protocol"]
    return f"{head}({name})" if name else head


def _conditions(row: Row) -> str:
    flags = [name for name in ("ready", "serving", "terminating") if row[name]]
    return ",".join(flags) if flags else "-"


def _sets(row: Row) -> str:
    sets = [name for name, key in (("cluster", "inClusterSet"), ("local", "inLocalSet")) if row[key]]
    return ",".join(sets) if sets else "-"


def _endpoints_summary(row: Row) -> str:
    """Endpoints in the cluster set, of all the port's endpoints."""
    endpoints = row["endpoints"]
    return f"{sum(1 for e in endpoints if e['inClusterSet'])}/{len(endpoints)}"


def _external(row: Row) -> str:
    values = [*row["externalIPs"], *row["loadBalancerIPs"]]
    if row["nodePort"] is not None:
        values.append(f"*:{row['nodePort']}")
    return _join(values)


def _affinity(row: Row) -> str:
    return "None" if row["sessionAffinity"] == "None" else f"ClientIP({age(row['affinityTimeoutSeconds'])})"


SERVICES: list[Column] = [
    ("NAMESPACE", lambda r: r["namespace"]),
    ("NAME", lambda r: r["service"]),
    ("PORT", _port),
    ("TYPE", lambda r: r["type"]),
    ("CLUSTER-IP", lambda r: _join(r["clusterIPs"])),
    ("EXTERNAL", _external),
    ("ENDPOINTS", _endpoints_summary),
    ("LOCAL", lambda r: str(sum(1 for e in r["endpoints"] if e["inLocalSet"]))),
    ("AFFINITY", _affinity),
]
SERVICES_WIDE: list[Column] = [
    ("NODEPORT-ADDRESSES", lambda r: _join(r["nodePortAddresses"])),
    ("INTERNAL-POLICY", lambda r: r["internalTrafficPolicy"]),
    ("EXTERNAL-POLICY", lambda r: r["externalTrafficPolicy"]),
]
ENDPOINTS: list[Column] = [
    ("NAMESPACE", lambda r: r["namespace"]),
    ("SERVICE", lambda r: r["service"]),
    ("PORT", _port),
    ("ENDPOINT", lambda r: r["address"]),
    ("CONDITIONS", _conditions),
    ("NODE", lambda r: r["node"] or "<none>"),
    ("SETS", _sets),
]
ENDPOINTS_WIDE: list[Column] = [
    ("LOCAL", lambda r: "yes" if r["isLocal"] else "no"),
]
AFFINITY: list[Column] = [
    ("NAMESPACE", lambda r: r["namespace"]),
    ("SERVICE", lambda r: r["service"]),
    ("PORT", _port),
    ("CLIENT", lambda r: r["client"]),
    ("ENDPOINT", lambda r: r["endpoint"]),
    ("AGE", lambda r: age(r["age"])),
    ("EXPIRES-IN", lambda r: age(r["expiresIn"])),
]
AFFINITY_WIDE: list[Column] = [
    ("TIMEOUT", lambda r: age(r["timeoutSeconds"])),
    ("WORKER", lambda r: str(r["worker"])),
]
CONNECTIONS: list[Column] = [
    ("NAMESPACE", lambda r: r["namespace"]),
    ("SERVICE", lambda r: r["service"]),
    ("PORT", _port),
    ("CLIENT", lambda r: r["client"]),
    ("ENDPOINT", lambda r: r["endpoint"] or "<none>"),
    ("STATE", lambda r: r["state"]),
    ("AGE", lambda r: age(r["age"])),
    ("TO-ENDPOINT", lambda r: str(r["bytesToEndpoint"])),
    ("TO-CLIENT", lambda r: str(r["bytesToClient"])),
]
CONNECTIONS_WIDE: list[Column] = [
    ("FRONTEND", lambda r: r["frontend"]),
    ("IDLE", lambda r: age(r["idle"])),
    ("WORKER", lambda r: str(r["worker"])),
]
COLUMNS: dict[str, tuple[list[Column], list[Column]]] = {
    "services": (SERVICES, SERVICES_WIDE),
    "endpoints": (ENDPOINTS, ENDPOINTS_WIDE),
    "affinity": (AFFINITY, AFFINITY_WIDE),
    "connections": (CONNECTIONS, CONNECTIONS_WIDE),
}


def render_table(columns: Sequence[Column], rows: Sequence[Row]) -> list[str]:
    cells = [[name for name, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["   ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]


def render_page(kind: str, page: Row, wide: bool = False) -> str:
    """A JSON page of the inspection API as a table (with its paging and worker errors)."""
    normal, extra = COLUMNS[kind]
    items: list[Row] = page["items"]
    lines = render_table(normal + (extra if wide else []), items) if items else [f"No {kind} found."]
    if page.get("next") is not None:
        lines.append(f"... {len(items)} of {page['total']} shown; more with --offset {page['next']}")
    for error in page.get("errors", ()):
        lines.append(f"warning: {error}")
    return "\n".join(lines) + "\n"
