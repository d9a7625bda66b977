"""Warning Events for objects pyproxy cannot use (SPEC.md §9), best effort and bounded.

Rules kept here:
- The log line is the record; an Event is a courtesy for `kubectl describe` users. Failing
  to post one is logged (one line) and never retried.
- One Event per (object, resourceVersion, reason): a watch that replays the same object
  (a re-list) does not repeat it. The memory of what was reported is bounded (oldest
  forgotten first), and so is the rate: at most `per_minute` Events in any minute.
- Only namespaced objects get Events (Services, EndpointSlices); the body is an
  events.k8s.io/v1 Event, as kube-proxy's recorder writes them.
"""

from __future__ import annotations

import datetime
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

from pyproxy.model.objects import InvalidObject

log = logging.getLogger("pyproxy.kube")

REPORTING_CONTROLLER = "pyproxy.io/pyproxy"
NOTE_LIMIT = 1024  # the API server rejects longer notes


def event_body(obj: Mapping[str, Any], err: InvalidObject, node_name: str, now: datetime.datetime) -> dict[str, Any] | None:
    """An API-shaped Warning Event about `obj`, or None when it cannot carry one."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    namespace, name = meta.get("namespace"), meta.get("name")
    if not isinstance(namespace, str) or not namespace or not isinstance(name, str) or not name:
        return None
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    regarding = {"apiVersion": api_version if isinstance(api_version, str) and api_version else
                 ("v1" if err.kind == "Service" else "discovery.k8s.io/v1"),
                 "kind": kind if isinstance(kind, str) and kind else err.kind, "namespace": namespace, "name": name}
    for field, key in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
        if isinstance(meta.get(key), str) and meta[key]:
            regarding[field] = meta[key][:256]
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        # a unique name as client-go's recorder makes it (generateName "x." is no longer valid)
        "metadata": {"name": f"{name[:230]}.{int(now.timestamp() * 1e9):x}", "namespace": namespace},
        "eventTime": now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": "Warning",
        "reason": "InvalidObject",
        "action": "Skip",
        "note": f"pyproxy on {node_name} skips this {err.kind}: {err.reason}"[:NOTE_LIMIT],
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": f"pyproxy-{node_name}"[:128],
        "regarding": regarding,
    }


def restart_event(node_name: str, restarts: int, crash_loop: bool, now: datetime.datetime) -> dict[str, Any]:
    """A Warning Event about this node: its serving process was started again after `restarts`
    deaths (pyproxy/lifecycle/master.py), in a crash loop or not. Node Events live in
    `default`, as the kubelet's do."""
    reason = "ProxyCrashLoop" if crash_loop else "ProxyRestarted"
    loop = " in a crash loop (restarts are backed off)" if crash_loop else ""
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{node_name[:200]}.pyproxy.{int(now.timestamp() * 1e9):x}", "namespace": "default"},
        "eventTime": now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": "Warning",
        "reason": reason,
        "action": "Restart",
        "note": (f"pyproxy on {node_name}: the serving process died and was started again "
                 f"({restarts} restart(s) since the supervisor started){loop}")[:NOTE_LIMIT],
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": f"pyproxy-{node_name}"[:128],
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": node_name},
    }


class EventBudget:
    """Decides which reports become Events: new ones only, and not too many per minute."""

    def __init__(self, per_minute: int = 10, remember: int = 1024) -> None:
        self.per_minute = per_minute
        self.remember = remember
        self._seen: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._sent: deque[float] = deque()

    def admit(self, identity: tuple[str, ...], now: float) -> bool:
        if identity in self._seen:
            return False
        self._seen[identity] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        while self._sent and now - self._sent[0] >= 60.0:
            self._sent.popleft()
        if len(self._sent) >= self.per_minute:
            return False
        self._sent.append(now)
        return True


class InvalidObjectReporter:
    """Called from watch threads with each invalid object; posts a bounded Warning Event."""

    def __init__(
        self,
        post: Callable[[str, dict[str, Any]], None],
        node_name: str,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
        budget: EventBudget | None = None,
    ) -> None:
        self.post = post
        self.node_name = node_name
        self.clock = clock
        self.wall_clock = wall_clock
        self.budget = budget or EventBudget()

    def __call__(self, obj: Mapping[str, Any], err: InvalidObject) -> None:
        body = event_body(obj, err, self.node_name, self.wall_clock())
        if body is None:
            return
        regarding = body["regarding"]
        identity = (err.kind, regarding["namespace"], regarding["name"], regarding.get("resourceVersion", ""), err.reason)
        if not self.budget.admit(identity, self.clock()):
            return
        try:
            self.post(regarding["namespace"], body)
        except Exception as exc:  # best effort: the log line already said it all
            log.info("could not post an Event about %s %s: %s", err.kind, err.key, str(exc).splitlines()[0])
