"""The benchmark backend: one cheap uvloop process speaking `bench.loadtool.protocol`.

Rules kept here:
- One `BufferedProtocol` per connection reading into one shared receive buffer (the loop is
  single-threaded, and `get_buffer`/`buffer_updated` come in strict pairs), so the sink path
  allocates nothing per read.
- The header may arrive in pieces; bytes after it in the same read belong to the payload.
- A bad header closes the connection; the server never raises out of a callback.
- Responses are preallocated per size; `D` mode honours `pause_writing`/`resume_writing`.
- SIGTERM and SIGINT stop the server cleanly (exit 0).

Usage: python -m bench.backend --port P --name NAME [--host ADDR] [--reuseport]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import sys
from typing import cast

from bench.loadtool import protocol as proto

RECV_BUFFER = 256 * 1024


class _Shared:
    """Per-process state: the receive buffer and the response cache."""

    def __init__(self, name: bytes) -> None:
        self.buffer = memoryview(bytearray(RECV_BUFFER))
        self.name_line = name + b"\n"
        self._payloads: dict[int, bytes] = {}

    def payload(self, size: int) -> bytes:
        data = self._payloads.get(size)
        if data is None:
            data = b"x" * size
            if len(self._payloads) < 64:
                self._payloads[size] = data
        return data


class BackendConnection(asyncio.BufferedProtocol):
    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.header: proto.Header | None = None
        self.received = 0  # sink: payload bytes; rr/crr: bytes towards the next request
        self.paused = False
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.shared.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.shared.buffer[:nbytes]
        if self.header is None:
            need = proto.HEADER_SIZE - len(self.head)
            self.head += data[:need]
            data = data[need:]
            if len(self.head) < proto.HEADER_SIZE:
                return
            try:
                self.header = proto.unpack_header(self.head)
            except proto.ProtocolError:
                self._close()
                return
            self._start()
        if len(data):
            self._payload(len(data))

    def _start(self) -> None:
        assert self.header is not None and self.transport is not None
        mode = self.header.mode
        if mode == proto.NAME:
            self.transport.write(self.shared.name_line)
            self._close()
        elif mode == proto.SOURCE:
            self._fill()

    def _payload(self, nbytes: int) -> None:
        assert self.header is not None and self.transport is not None
        mode = self.header.mode
        self.received += nbytes
        if mode in (proto.REQUEST_RESPONSE, proto.CONNECT_REQUEST_RESPONSE) and not self.done:
            due, self.received = proto.responses_due(self.received, self.header.a)
            if due == 0:
                return
            if mode == proto.CONNECT_REQUEST_RESPONSE:
                self.transport.write(self.shared.payload(self.header.b))
                self._close()
            else:
                self.transport.write(self.shared.payload(self.header.b) * due)

    def _fill(self) -> None:
        assert self.header is not None and self.transport is not None
        chunk = self.shared.payload(self.header.b)
        while not self.paused and not self.done and not self.transport.is_closing():
            self.transport.write(chunk)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.header is not None and self.header.mode == proto.SOURCE:
            self._fill()

    def eof_received(self) -> bool | None:
        if self.header is not None and self.header.mode == proto.SINK and self.transport:
            self.transport.write(proto.COUNT.pack(self.received))
        self.done = True
        return None  # let the transport close (after flushing what was written)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.transport = None

    def _close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()


def raise_nofile_limit(want: int = 262144) -> None:
    """Lift the open-files limit (idle runs hold 10k sockets): to `want` where allowed
    (root may raise the hard limit too), else the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, name: str, reuseport: bool, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    shared = _Shared(name.encode())
    server = await loop.create_server(
        lambda: BackendConnection(shared), host, port, reuse_port=reuseport, backlog=backlog
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"backend {name} listening on {host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True, help="self-identification for affinity (`N` mode)")
    p.add_argument("--reuseport", action="store_true")
    p.add_argument("--backlog", type=int, default=4096)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile_limit()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.name, args.reuseport, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
