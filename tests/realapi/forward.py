"""A TCP forwarder from a lab namespace to the root namespace's loopback (stdlib only).

The realapi tier runs etcd and kube-apiserver on the root namespace's 127.0.0.1, where the
test process reaches them; pyproxy runs in a node namespace of the lab, which cannot reach
another namespace's loopback. This process bridges the two without touching the root
namespace's links, addresses, routes or firewall:

- it starts in the root namespace, enters the lab namespace only long enough to create its
  listening socket there (a socket keeps the namespace it was made in), then returns;
- each accepted connection is dialled to the target from the root namespace and copied
  both ways with bounded buffers (`drain()` after every write), half-closes forwarded;
- it prints `ready` once listening, and ends on SIGTERM (its parent stops it by PID).

    python tests/realapi/forward.py --netns /run/netns/NAME --listen 192.168.56.2:6443 \
        --to 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
MAX_CONNECTIONS = 256
CHUNK = 1 << 16


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in(netns: str, host: str, port: int) -> socket.socket:
    """A listening socket made inside `netns`; the calling thread ends where it began."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.create_server((host, port), backlog=64, reuse_port=False)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def serve(sock: socket.socket, target: tuple[str, int]) -> None:
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with slots:
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
            except (OSError, asyncio.TimeoutError):
                writer.transport.abort()  # the API server is down: the client sees a reset
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                for w in (writer, up_writer):
                    w.close()

    server = await asyncio.start_server(handle, sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--netns", required=True)
    parser.add_argument("--listen", required=True, type=_address)
    parser.add_argument("--to", required=True, type=_address)
    args = parser.parse_args(argv)
    sock = listen_in(args.netns, *args.listen)
    asyncio.run(serve(sock, args.to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
