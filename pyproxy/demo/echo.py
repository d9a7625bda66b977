"""The demo's and tests' pod: an echo server that names itself and the client it saw.

One process serves every given TCP and UDP port. On TCP, the first line picks the mode:
- an HTTP request line (`GET / HTTP/1.1`): an HTTP/1.0 answer whose body is the one line
  the write-ups show: `Host=<host>  Path=<path>  From=<pod>  ClientIP=<ip>  XFF=`;
- `WHO`: `pod=<pod> client=<ip> port=<local port>` and close;
- `ECHO`: every byte back until EOF, then EOF back (data integrity, half-close);
- `SINK`: read to EOF, answer `<count> <sha256>`;
- `HOLD`: like WHO but the line is sent and the connection stays open, echoing, until EOF.
It listens on both families (IPv4 and IPv6 sockets of their own) where IPv6 exists.
On UDP every datagram is answered with `pod=<pod> client=<ip> port=<local port> len=<n>`
followed by the datagram itself (so large datagrams come back whole).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
from collections.abc import Sequence
from typing import cast

READ_SIZE = 1 << 16


def who(pod: str, writer: asyncio.StreamWriter) -> bytes:
    client = writer.get_extra_info("peername")[0]
    port = writer.get_extra_info("sockname")[1]
    return f"pod={pod} client={client} port={port}\n".encode()


async def serve_tcp(pod: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
        command = line.strip().split(b" ")[0]
        if command in (b"GET", b"HEAD", b"POST"):
            await _http(pod, line, reader, writer)
        elif command == b"WHO":
            writer.write(who(pod, writer))
        elif command == b"HOLD":
            writer.write(who(pod, writer))
            await _echo(reader, writer)
        elif command == b"ECHO":
            await _echo(reader, writer)
        elif command == b"SINK":
            digest, count = hashlib.sha256(), 0
            while chunk := await reader.read(READ_SIZE):
                digest.update(chunk)
                count += len(chunk)
            writer.write(f"{count} {digest.hexdigest()}\n".encode())
        await writer.drain()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(READ_SIZE):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _http(pod: str, request_line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host = ""
    for _ in range(100):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode(errors="replace").partition(":")
        if name.lower() == "host":
            host = value.strip()
    parts = request_line.decode(errors="replace").split()
    path = parts[1] if len(parts) > 1 else "/"
    client = writer.get_extra_info("peername")[0]
    body = f"Host={host}  Path={path}  From={pod}  ClientIP={client}  XFF=\n".encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    writer.write(head + body)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, pod: str, port: int) -> None:
        self.pod = pod
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's don't subclass asyncio's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        head = f"pod={self.pod} client={addr[0]} port={self.port} len={len(data)}\n".encode()
        self.transport.sendto(head + data, addr)


def _hosts(host: str) -> list[str]:
    """The addresses to listen on: `host`, and for the IPv4 wildcard also the IPv6 one (each
    socket of one family, so an IPv4 client is seen as itself, never as ::ffff:a.b.c.d)."""
    if host != "0.0.0.0" or not socket.has_ipv6:
        return [host]
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:  # no IPv6 here
        return [host]
    return [host, "::"]


async def serve(pod: str, tcp_ports: Sequence[int], udp_ports: Sequence[int], host: str) -> None:
    loop = asyncio.get_running_loop()
    hosts = _hosts(host)
    servers = [
        await asyncio.start_server(lambda r, w: serve_tcp(pod, r, w), hosts, port, reuse_address=True)
        for port in tcp_ports
    ]
    for port in udp_ports:
        for each in hosts:
            sock = socket.socket(socket.AF_INET6 if ":" in each else socket.AF_INET, socket.SOCK_DGRAM)
            if ":" in each:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((each, port))
            await loop.create_datagram_endpoint(lambda p=port: UdpEcho(pod, p), sock=sock)  # type: ignore[misc]
    print(f"ready {pod}", flush=True)
    try:
        await asyncio.Event().wait()  # serve until killed
    finally:
        for server in servers:
            server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyproxy-echo")
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.name, args.tcp, args.udp, args.host))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
