"""A tiny HTTP/1.x responder on asyncio streams: one request per connection, then close.

Enough for health probes, load-balancer health checks and Prometheus scrapes, with no new
dependency. Rules kept here:
- The handler is a plain function `(method, path) -> Response`; it decides, this module
  only reads the request head and writes the answer. A `QueryHandler` (`serve_http`) also
  gets the query parameters and may await (the inspection API asks other workers).
- Every read is bounded in size (16 KiB head, 64 KiB body) and in time; a request body is
  read and dropped so that closing never resets a client that is still sending.
- HEAD gets the headers without the body. Every answer carries `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import os
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pyproxy.observe.health import Response

log = logging.getLogger("pyproxy.http")

Handler = Callable[[str, str], Response]
QueryHandler = Callable[[str, str, Mapping[str, str]], Awaitable[Response]]  # (method, path, query)
HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 64 * 1024
READ_TIMEOUT = 5.0


async def start_http(host: str, port: int, handler: Handler, sock: socket.socket | None = None) -> asyncio.Server:
    """Listen on host:port, or serve on `sock` (a listener handed over by a predecessor);
    raises OSError when the port cannot be bound."""
    if sock is not None:
        return await asyncio.start_server(functools.partial(_serve_one, handler), sock=sock, limit=HEAD_LIMIT)
    return await asyncio.start_server(
        functools.partial(_serve_one, handler), host or "0.0.0.0", port, limit=HEAD_LIMIT, reuse_address=True
    )


async def serve_http(host: str, port: int, handler: QueryHandler, sock: socket.socket | None = None) -> asyncio.Server:
    """Like `start_http`, for a handler that takes the query and may await."""
    if sock is not None:
        return await asyncio.start_server(functools.partial(_serve, handler), sock=sock, limit=HEAD_LIMIT)
    return await asyncio.start_server(
        functools.partial(_serve, handler), host or "0.0.0.0", port, limit=HEAD_LIMIT, reuse_address=True
    )


async def serve_unix(sock: socket.socket, handler: QueryHandler) -> asyncio.Server:
    """Serve on an already bound unix socket (a worker's socket), to peers of this process's
    own user only (an abstract socket has no file permissions to do that job)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer_uid(writer.get_extra_info("socket")) != os.getuid():
            writer.close()
            return
        await _serve(handler, reader, writer)

    return await asyncio.start_unix_server(serve, sock=sock, limit=HEAD_LIMIT)


def peer_uid(sock: Any) -> int | None:
    """The user id of a unix socket's peer (SO_PEERCRED), None if it cannot be read."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", raw)[1])


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """(path, query parameters) of a request target; a repeated parameter keeps its last value."""
    path, _, query = target.partition("?")
    return path, dict(urllib.parse.parse_qsl(query, keep_blank_values=True))


def render(response: Response, head_only: bool = False) -> bytes:
    reason = http.HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines += [f"Content-Length: {len(response.body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    return head if head_only else head + response.body


def parse_head(head: bytes) -> tuple[str, str, int]:
    """(method, path without query, Content-Length) of a request head; ValueError if malformed."""
    method, target, length = parse_request(head)
    return method, target.split("?", 1)[0], length


def parse_request(head: bytes) -> tuple[str, str, int]:
    """(method, target with its query, Content-Length) of a request head; ValueError if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"unsupported version {version!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, target, length


async def _serve_one(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def answer(method: str, path: str, query: Mapping[str, str]) -> Response:
        return handler(method, path)

    await _serve(answer, reader, writer)


async def _serve(handler: QueryHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        try:
            method, target, length = parse_request(head)
            path, query = split_target(target)
        except ValueError:
            writer.write(render(Response(400)))
            return
        if 0 < length <= BODY_LIMIT:
            await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
        try:
            response = await handler(method, path, query)
        except Exception:
            log.exception("HTTP handler failed for %s %s", method, path)
            response = Response(500)
        writer.write(render(response, head_only=method == "HEAD"))
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass  # a client that went away or misbehaved: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT)
