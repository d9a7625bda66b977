"""The pure half of the cluster source: what a list-then-watch loop decides, without I/O.

Rules kept here (kopf's `watching.py`, client-go's reflector, STYLE.md 3):
- A watch starts from the resourceVersion of the last list or event (`WatchState`). With no
  resourceVersion the loop must list first; a list is a complete snapshot.
- Each watch event becomes one decision: upsert an object, delete it, note a bookmark,
  re-list (410 Gone: our resourceVersion has expired), reconnect (any other error), or
  skip an object that has no usable name (its resourceVersion still counts).
- Reconnects back off exponentially up to a cap, jittered so that many proxies restarted
  together do not reconnect in lockstep (`Backoff`).
- Watch handlers hand their results to the event loop through `Pending`, which coalesces:
  per object only the newest value is kept, and a new snapshot replaces everything queued
  before it. Its size is bounded by the number of distinct objects, however fast events come.
- Objects stay API-shaped dicts (camelCase) until `pyproxy.model.objects` parses them.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pyproxy.model.objects import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
MAX_LINE_BYTES = 64 * 1024 * 1024  # one watch event; a huge EndpointSlice is ~1 MiB

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Kind:
    """One watched collection and the selectors that keep the proxy's share of it."""

    name: str  # "Service", "EndpointSlice", "Node"
    label_selector: str | None = None
    field_selector: str | None = None


def watched_kinds(node_name: str, proxy_name: str | None) -> tuple[Kind, Kind, Kind]:
    """Services, EndpointSlices and our own Node, selected as kube-proxy selects them.

    A configured proxy name must also see the Services labelled with it, which no label
    selector can express next to "unlabelled"; then every Service is listed and
    `parse_service` keeps the unlabelled ones and ours.
    """
    services = None if proxy_name else f"!{SERVICE_PROXY_NAME_LABEL}"
    return (
        Kind("Service", label_selector=services),
        Kind("EndpointSlice", label_selector=f"!{HEADLESS_LABEL}"),
        Kind("Node", field_selector=f"metadata.name={node_name}"),
    )


def object_key(obj: Mapping[str, Any]) -> ObjectKey | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv else None


# decisions


@dataclass(frozen=True)
class Upsert:
    key: ObjectKey
    obj: Mapping[str, Any]


@dataclass(frozen=True)
class Delete:
    key: ObjectKey
    obj: Mapping[str, Any]


@dataclass(frozen=True)
class Relist:
    reason: str


@dataclass(frozen=True)
class Reconnect:
    reason: str


@dataclass(frozen=True)
class Skip:
    """An event about an object that cannot even be named: logged, and the watch goes on
    (a reconnect would replay it from the same resourceVersion, forever)."""

    reason: str


Decision = Upsert | Delete | Relist | Reconnect | Skip | None


class WatchState:
    """Where a watch resumes from; `resource_version is None` means "list first"."""

    def __init__(self) -> None:
        self.resource_version: str | None = None

    def listed(self, list_body: Mapping[str, Any]) -> None:
        self.resource_version = resource_version(list_body) or None

    def on_event(self, event: Any) -> Decision:
        if not isinstance(event, Mapping) or not isinstance(event.get("object"), Mapping):
            return Reconnect(f"malformed watch event: {str(event)[:200]}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or ""
            return self.on_status(code if isinstance(code, int) else 0, str(message)[:500])
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            return Reconnect(f"unknown watch event type {kind!r}")
        rv = resource_version(obj)
        if rv is not None:
            self.resource_version = rv
        if kind == "BOOKMARK":
            return None
        key = object_key(obj)
        if key is None:
            return Skip(f"{kind} event about an object without a string metadata.name")
        return Delete(key, obj) if kind == "DELETED" else Upsert(key, obj)

    def on_status(self, code: int, message: str) -> Relist | Reconnect:
        """An error status, in a watch stream or as the HTTP answer to a list or watch."""
        if code == 410:  # Gone: the resourceVersion was compacted away; only a re-list helps
            self.resource_version = None
            return Relist(f"410 Gone: {message}" if message else "410 Gone")
        return Reconnect(f"{code}: {message}" if message else f"status {code}")


# reconnecting


@dataclass(frozen=True)
class Backoff:
    """Exponential, capped, jittered: delay(n) for the n-th failure in a row (n >= 1)."""

    initial: float = 0.8
    factor: float = 2.0
    cap: float = 15.0
    jitter: float = 0.5  # the delay is spread over [base*(1-jitter), base*(1+jitter)], then capped

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.cap, self.initial * self.factor ** max(0, failures - 1))
        spread = 1.0 + self.jitter * (2.0 * rng.random() - 1.0)
        return min(self.cap, base * spread)


@dataclass(frozen=True)
class WatchTiming:
    """How long to wait for the API server, and when a silent watch counts as dead."""

    connect_timeout: float = 10.0
    list_timeout: float = 60.0  # per page
    page_size: int = 500
    # The server ends each watch after this long (jittered up to 2x, as client-go does);
    # the client simply watches again from the last resourceVersion.
    watch_timeout: int = 300
    # No bytes for this long on an open watch (bookmarks arrive about once a minute): the
    # connection is presumed dead and the watch restarts from the last resourceVersion.
    silence_timeout: float = 90.0
    backoff: Backoff = Backoff()

    def server_watch_timeout(self, rng: random.Random) -> int:
        return int(self.watch_timeout * (1.0 + rng.random()))


# framing


def json_lines(chunks: Iterable[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Split a watch stream (one JSON object per line) into lines, however it is chunked."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if line:
                yield line
        if len(buffer) > max_line:
            raise ValueError(f"watch event longer than {max_line} bytes")
    if buffer.strip():
        yield bytes(buffer).strip()


# hand-off to the event loop


class Pending(Generic[K, V]):
    """Changes queued by a watch thread for the event loop, coalesced per key.

    `snapshot()` and `change()` return True when the queue was empty before, i.e. when the
    caller must schedule one `take()` on the loop; further changes ride along with it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[K, V] | None = None
        self._changes: dict[K, V | None] = {}
        self._scheduled = False

    def snapshot(self, items: Mapping[K, V]) -> bool:
        with self._lock:
            self._snapshot = dict(items)
            self._changes.clear()
            return self._schedule()

    def change(self, key: K, value: V | None) -> bool:
        with self._lock:
            self._changes.pop(key, None)  # re-insert: the newest change goes last
            self._changes[key] = value
            return self._schedule()

    def take(self) -> tuple[dict[K, V] | None, dict[K, V | None]]:
        with self._lock:
            taken = (self._snapshot, self._changes)
            self._snapshot, self._changes, self._scheduled = None, {}, False
            return taken

    def __len__(self) -> int:
        with self._lock:
            return len(self._changes) + (len(self._snapshot) if self._snapshot is not None else 0)

    def _schedule(self) -> bool:
        first, self._scheduled = not self._scheduled, True
        return first
