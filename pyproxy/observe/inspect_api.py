"""The debug API's HTTP edge: `/debug/*` (and, with workers, `/metrics`) for one proxy.

It lives with the other HTTP servers (observe/); the views it serves are inspect/'s.

Theory of operation:
- The debug API lives on the metrics address (`metricsBindAddress`, loopback by default),
  beside `/metrics`: nothing new is exposed. It answers GET `/debug/services`,
  `/debug/endpoints`, `/debug/affinity` and `/debug/connections` with JSON pages
  (`views.page`), filtered by `namespace`, `service` and `client`, paged by `offset` and
  `limit`; `/debug` lists them. A bad parameter is a 400 naming it.
- With `--workers N`, every worker is a whole proxy with its own affinity table, open
  connections and counters. Workers 1..N-1 each serve their own view, and their own
  /metrics, on an abstract unix socket named after the supervisor's pid and their index
  (`worker_socket_name`; abstract, so nothing is left on disk, and per network namespace).
  Worker 0 answers on the metrics address: for affinity and connections it asks every
  other worker for its first offset+limit rows and merges the pages (rows carry their
  worker); services and endpoints come from worker 0 alone, since every worker holds the
  same model; /metrics sums the pyproxy_* families of every worker
  (`observe/aggregate.py`). A worker that does not answer within `PEER_TIMEOUT` is
  reported in the page's `errors`, and the rest is still served.
- Reading the proxy is `ProxyReader` (read-only); turning it into pages is `views`.
  Worker sockets are read with a blocking client in a thread: the event loop never waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pyproxy.inspect import views
from pyproxy.inspect.reader import ProxyReader
from pyproxy.inspect.views import KINDS, Query, QueryError, Row
from pyproxy.observe.aggregate import merge_exposition
from pyproxy.observe.health import Response
from pyproxy.observe.http import serve_unix

log = logging.getLogger("pyproxy.inspect")

PEER_TIMEOUT = 3.0
PEER_READ_LIMIT = 64 << 20
JSON = (("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"))
MERGED = ("affinity", "connections")  # the kinds that differ between workers


def worker_socket_name(group: int, index: int) -> str:
    """The abstract unix socket of worker `index` of the workers started by process `group`."""
    return f"\0pyproxy-{group}-worker-{index}"


def json_response(status: int, body: object) -> Response:
    return Response(status, (json.dumps(body, indent=1) + "\n").encode(), JSON)


def not_found() -> Response:
    return Response(404, b"404 page not found\n", (("Content-Type", "text/plain; charset=utf-8"),))


@dataclass
class InspectApi:
    reader: ProxyReader
    metrics: Callable[[], bytes]  # this worker's own /metrics exposition
    metrics_type: str = "text/plain; version=0.0.4; charset=utf-8"
    peers: Sequence[str] = ()  # the other workers' socket names (worker 0 only)
    workers: int = 1
    debug: bool = True  # dataplane.debugAPI: serve /debug/*
    fetch: Callable[[str, str, float], tuple[int, bytes]] = field(default_factory=lambda: fetch_unix)

    async def answer(self, method: str, path: str, query: Mapping[str, str]) -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET\n", (("Allow", "GET, HEAD"),))
        if path == "/metrics":
            return await self._metrics()
        if not self.debug or not path.startswith("/debug"):
            return not_found()
        kind = path.removeprefix("/debug").strip("/")
        if kind == "":
            return json_response(200, {"kinds": [f"/debug/{k}" for k in KINDS], "workers": self.workers,
                                       "parameters": ["namespace", "service", "client", "offset", "limit"]})
        if kind not in KINDS:
            return not_found()
        try:
            parsed = views.parse_query(query)
        except QueryError as err:
            return json_response(400, {"error": str(err)})
        return json_response(200, await self.page(kind, parsed))

    async def page(self, kind: str, query: Query) -> Row:
        if kind not in MERGED or not self.peers:
            return self.reader.page(kind, query, self.workers)
        wide = Query(query.namespace, query.service, query.client, 0, query.offset + query.limit)
        pages = [self.reader.page(kind, wide)]
        errors: list[str] = []
        target = f"/debug/{kind}?{urllib.parse.urlencode(views.query_params(wide))}"
        for name, answer in zip(self.peers, await self._ask_peers(target)):
            if isinstance(answer, str):
                errors.append(f"{_label(name)}: {answer}")
                continue
            try:
                pages.append(json.loads(answer))
            except ValueError as err:
                errors.append(f"{_label(name)}: not JSON ({err})")
        return views.merge(kind, pages, query, self.workers, errors)

    async def _metrics(self) -> Response:
        own = self.metrics()
        if not self.peers:
            return Response(200, own, (("Content-Type", self.metrics_type),))
        texts = [own.decode()]
        for name, answer in zip(self.peers, await self._ask_peers("/metrics")):
            if isinstance(answer, str):
                log.warning("/metrics: %s did not answer: %s", _label(name), answer)
            else:
                texts.append(answer.decode())
        return Response(200, merge_exposition(texts), (("Content-Type", self.metrics_type),))

    async def _ask_peers(self, target: str) -> list[bytes | str]:
        """Every peer's answer body, or a string saying why there is none."""
        async def ask(name: str) -> bytes | str:
            try:
                status, body = await asyncio.to_thread(self.fetch, name, target, PEER_TIMEOUT)
            except OSError as err:
                return f"no answer ({err})"
            return body if status == 200 else f"status {status}"

        return list(await asyncio.gather(*(ask(name) for name in self.peers)))


def _label(name: str) -> str:
    return "worker " + name.rsplit("-", 1)[-1]


def fetch_unix(name: str, target: str, timeout: float) -> tuple[int, bytes]:
    """GET `target` from the HTTP server on unix socket `name`: (status, body). Blocking."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(name)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: worker\r\n\r\n".encode())
        parts, size = [], 0
        while chunk := sock.recv(1 << 16):
            parts.append(chunk)
            size += len(chunk)
            if size > PEER_READ_LIMIT:
                raise OSError(f"answer larger than {PEER_READ_LIMIT} bytes")
    head, _, body = b"".join(parts).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError("not an HTTP answer")
    return int(status_line[1]), body


async def serve_worker_socket(name: str, api: InspectApi) -> asyncio.Server:
    """Serve this worker's own view on its abstract unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await serve_unix(sock, api.answer)
