"""The bench wire protocol: one 9-byte header, then a mode-specific byte stream.

Rules kept here:
- The client opens every connection with a header: `!cII` = mode byte, `a`, `b` (network order).
- Modes (what the backend does after the header):
  - `S` sink: read and count every byte; on the client's EOF (half-close) answer the count as
    `!Q` and close. The client gets *delivered* bytes, not bytes it merely queued.
  - `D` source: send `b`-byte chunks as fast as flow control allows until the client closes.
  - `R` request/response: for every `a` bytes received, send `b` bytes; the connection stays
    open (persistent, pipelining allowed).
  - `C` connect-request-response: like `R` for one request, then the *backend* closes first,
    so TIME_WAIT lands on the server side and neither the client nor a proxy runs out of ports.
  - `N` name: send the backend's name plus `\\n`, then close (affinity: who answered?).
- Payload bytes carry no meaning; only their count matters.
- Everything here is pure: packing, unpacking, limits. Sockets live in `backend` and `client`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!cII")
HEADER_SIZE = HEADER.size  # 9
COUNT = struct.Struct("!Q")

SINK = b"S"
SOURCE = b"D"
REQUEST_RESPONSE = b"R"
CONNECT_REQUEST_RESPONSE = b"C"
NAME = b"N"
MODES = frozenset({SINK, SOURCE, REQUEST_RESPONSE, CONNECT_REQUEST_RESPONSE, NAME})

MAX_MESSAGE = 16 * 1024 * 1024  # bound on a request, response or chunk size


class ProtocolError(ValueError):
    """A header the backend refuses (unknown mode, size out of bounds)."""


@dataclass(frozen=True)
class Header:
    mode: bytes
    a: int = 0
    b: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.mode, self.a, self.b)


def unpack_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate exactly HEADER_SIZE bytes."""
    mode, a, b = HEADER.unpack(bytes(data[:HEADER_SIZE]))
    if mode not in MODES:
        raise ProtocolError(f"unknown mode {mode!r}")
    if a > MAX_MESSAGE or b > MAX_MESSAGE:
        raise ProtocolError(f"size out of bounds: a={a} b={b}")
    if mode in (REQUEST_RESPONSE, CONNECT_REQUEST_RESPONSE) and a == 0:
        raise ProtocolError("request size must be > 0")
    if mode == SOURCE and b == 0:
        raise ProtocolError("chunk size must be > 0")
    return Header(mode, a, b)


def sink() -> Header:
    return Header(SINK)


def source(chunk: int) -> Header:
    return Header(SOURCE, 0, chunk)


def rr(request: int, response: int) -> Header:
    return Header(REQUEST_RESPONSE, request, response)


def crr(request: int, response: int) -> Header:
    return Header(CONNECT_REQUEST_RESPONSE, request, response)


def name() -> Header:
    return Header(NAME)


def responses_due(pending: int, request: int) -> tuple[int, int]:
    """(complete requests in `pending` bytes, bytes left over) for a request size."""
    return divmod(pending, request)
