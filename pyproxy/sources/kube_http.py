"""List, watch and post to the API server over the standard library's HTTP client.

Rules kept here:
- Implements `kube_client.Transport` with `http.client` and `ssl` only: no `kubernetes`
  package and no urllib3 on the serving path (they cost a node most of a second of imports
  and tens of MiB at every start). The wire format is the API's JSON; objects stay dicts.
- Every call has a connect timeout (TCP and the TLS handshake) and a read timeout; on a
  watch the read timeout is the silence after which the connection is presumed dead: the
  watch ends quietly and the loop watches again from the last resourceVersion.
- A list's pages share one keep-alive connection, opened for its first page and closed
  after its last; every watch has its own connection; `interrupt()` shuts the open sockets
  so that watch threads blocked on a read return at once.
- Non-2xx answers become `StatusError(code, message)`; a 401 also makes an exec plugin's
  credential be renewed before the next request.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from pyproxy.sources.kube_client import SourceError, StatusError, Transport, WatchStream, client_transport, status_message
from pyproxy.sources.kube_config import ConfigProblem, Connection, load
from pyproxy.sources.kube_watch import Kind, WatchTiming, json_lines

log = logging.getLogger("pyproxy.kube")

PATHS = {
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
    "Node": "/api/v1/nodes",
}
READ_CHUNK = 64 * 1024
USER_AGENT = "pyproxy"


def open_transport(kubeconfig: str, master: str) -> Transport:
    """Connect settings -> a transport (reads files, may run an exec plugin: call it off the
    event loop). The `kubernetes` package is loaded only for an auth-provider user."""
    try:
        connection = load(kubeconfig, master)
    except ConfigProblem as err:
        where = kubeconfig or master or "in-cluster config"
        raise SourceError(f"cannot load API server connection settings ({where}): {err}") from None
    if connection is None:
        log.info("the kubeconfig's user has an auth-provider: using the kubernetes client")
        return client_transport(kubeconfig, master)
    return HttpTransport(connection)


class _Https(http.client.HTTPConnection):
    """HTTPS with our context and an optional tls-server-name (http.client's own HTTPSConnection
    checks the certificate against the host it dials)."""

    default_port = 443

    def __init__(self, host: str, port: int, timeout: float, context: Any, server_name: str | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._context = context
        self._server_name = server_name or host

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


class HttpTransport:
    """The API server through http.client: see the module doc."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._local = threading.local()  # the calling thread's list connection, between pages
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    # -- the Transport interface ---------------------------------------------------------------

    def list_page(self, kind: Kind, continue_token: str | None, timing: WatchTiming) -> Mapping[str, Any]:
        query = self._selectors(kind) | {"limit": str(timing.page_size)}
        if continue_token:
            query["continue"] = continue_token
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None or continue_token is None:  # a list starts on a fresh connection
            self._drop_list_connection()
            conn = self._local.conn = self._connect(timing.connect_timeout, timing.list_timeout)
        try:
            response = self._send(conn, "GET", PATHS[kind.name], query)
            data = response.read()
            _check(response, data, f"list of {kind.name}")
            body = json.loads(data)
        except BaseException:
            self._drop_list_connection()
            raise
        if not isinstance(body, Mapping):
            self._drop_list_connection()
            raise SourceError(f"list of {kind.name}: answer is not an object")
        if not (body.get("metadata") or {}).get("continue"):
            self._drop_list_connection()
        return body

    def watch(self, kind: Kind, resource_version: str, timing: WatchTiming, timeout: int) -> WatchStream:
        query = self._selectors(kind) | {
            "watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
        }
        conn = self._connect(timing.connect_timeout, timing.silence_timeout)
        try:
            response = self._send(conn, "GET", PATHS[kind.name], query)
            if not 200 <= response.status <= 299:
                _check(response, response.read(), f"watch of {kind.name}")
            for line in json_lines(_chunks(response)):
                yield json.loads(line)
        except TimeoutError:
            # Silent for `silence_timeout`: the connection may be dead. End this watch; the
            # loop watches again from the last resourceVersion (and backs off if that fails).
            log.info("%s: no watch event for %gs; watching again", kind.name, timing.silence_timeout)
        finally:
            self._close(conn)

    def interrupt(self) -> None:
        """Unblock calls waiting for bytes (called from another thread at shutdown)."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed: nothing to unblock
                    pass

    def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        path = f"/apis/events.k8s.io/v1/namespaces/{quote(namespace, safe='')}/events"
        conn = self._connect(5.0, 5.0)
        try:
            response = self._send(conn, "POST", path, {}, json.dumps(dict(body)).encode())
            _check(response, response.read(), "posting an Event")
        finally:
            self._close(conn)

    def close(self) -> None:
        self._drop_list_connection()

    # -- connections -----------------------------------------------------------------------------

    def _connect(self, connect_timeout: float, read_timeout: float) -> http.client.HTTPConnection:
        host, port, https = self.connection.address
        conn: http.client.HTTPConnection
        if https:
            context = self.connection.context()
            conn = _Https(host, port, connect_timeout, context, self.connection.tls.server_name)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        with self._lock:
            self._open.add(conn)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)
        except BaseException:
            self._close(conn)
            raise
        return conn

    def _close(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def _drop_list_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self._close(conn)

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str, query: dict[str, str],
              body: bytes | None = None) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        authorization = self.connection.auth.header()
        if authorization:
            headers["Authorization"] = authorization
        if body is not None:
            headers["Content-Type"] = "application/json"
        target = self.connection.base_path + path + (f"?{urlencode(query)}" if query else "")
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        if response.status == 401:
            self.connection.auth.rejected()
        return response

    @staticmethod
    def _selectors(kind: Kind) -> dict[str, str]:
        selectors = {"labelSelector": kind.label_selector, "fieldSelector": kind.field_selector}
        return {k: v for k, v in selectors.items() if v}


def _check(response: http.client.HTTPResponse, data: bytes, what: str) -> None:
    if not 200 <= response.status <= 299:
        raise StatusError(response.status, status_message(data, f"{what} failed ({response.reason})"))


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body as it arrives (chunked or not), until the server ends it."""
    while chunk := response.read1(READ_CHUNK):
        yield chunk
