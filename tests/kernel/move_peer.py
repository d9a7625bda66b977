"""One relay process for the connection-moving tests: relays, hands over, takes over.

Run in a test's namespace: `python -m tests.kernel.move_peer --relay protocol|splice
--loop uvloop|asyncio --listen IP:PORT --endpoint IP:PORT --inbox PATH`. It serves one
Service whose endpoint is `--endpoint` on `--listen` (no TPROXY needed: the listen address
itself is routed as a frontend), and accepts hand-overs on the unix socket `--inbox`.
On stdin, `handover PATH` exports every connection (pyproxy.lifecycle.connections), sends
the messages to PATH (length-prefixed JSON, fds with SCM_RIGHTS), closes its dups, prints
`moved N left M`, drains what is left and prints `drained cut=K`. Each hand-over received
prints `adopted N`. `count` prints `pairs N`; EOF on stdin ends the process.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from pyproxy.dataplane.relay import Relay, RelayConfig
from pyproxy.dataplane.splice import FastRelay, TcpRelay
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.lifecycle.connections import Message, adopt_connections, export_connections
from pyproxy.model.objects import ServiceKey, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable

SERVICE = ("10.96.0.1", 80)
LENGTH = struct.Struct("!II")  # body length, fd count


@dataclass
class Peer:
    """What the hooks need of an app: its relays."""

    relay: TcpRelay
    udp: UdpRelay
    inbox: list[Message] = field(default_factory=list)


def table_for(listen: tuple[str, int], endpoint: tuple[str, int]) -> ServiceTable:
    store = ClusterStore()
    key = ServiceKey("default", "stream")
    service = parse_service({"kind": "Service", "metadata": {"name": key.name, "namespace": key.namespace},
                             "spec": {"clusterIP": SERVICE[0], "ports": [{"port": SERVICE[1]}]}})
    endpoint_slice = parse_endpoint_slice({
        "kind": "EndpointSlice", "metadata": {"name": "stream-1", "namespace": key.namespace,
                                              "labels": {"kubernetes.io/service-name": key.name}},
        "ports": [{"port": endpoint[1]}], "endpoints": [{"addresses": [endpoint[0]], "nodeName": "node1"}],
    })
    assert service is not None and endpoint_slice is not None
    store.replace_all([service], [endpoint_slice])
    table = ServiceTable("node1")
    table.update({key}, store, ())
    table.routes[(listen[0], "TCP", listen[1])] = table.routes[(SERVICE[0], "TCP", SERVICE[1])]
    return table


def send_messages(path: str, messages: list[Message]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        for message in messages:
            body = json.dumps({"kind": message.kind, "body": message.body}).encode()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", message.fds).tobytes())]
            sock.sendmsg([LENGTH.pack(len(body), len(message.fds)) + body], rights)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the peer has taken them all


def receive_messages(conn: socket.socket) -> list[Message]:
    messages = []
    while True:
        head, ancillary, _, _ = conn.recvmsg(LENGTH.size, socket.CMSG_SPACE(64 * 4))
        if not head:
            return messages
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        size, count = LENGTH.unpack(head)
        body = b""
        while len(body) < size:
            body += conn.recv(size - len(body))
        raw: dict[str, Any] = json.loads(body)
        assert len(fds) == count, (len(fds), count)
        messages.append(Message(raw["kind"], raw["body"], tuple(fds)))


async def serve_inbox(peer: Peer, path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(True)
        messages = await asyncio.to_thread(receive_messages, conn)
        await adopt_connections(peer, messages)  # type: ignore[arg-type]
        conn.sendall(b"k")
        conn.close()
        print(f"adopted {len(messages)}", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    listen = _address(args.listen)
    table = table_for(listen, _address(args.endpoint))
    stats = DataplaneStats()
    config = RelayConfig(idle_timeout=args.idle, half_close_timeout=args.idle)
    relay: TcpRelay = (FastRelay(table, lambda ip: False, stats, config) if args.relay == "splice"
                       else Relay(table, lambda ip: False, stats, config))
    await relay.start(*listen)
    peer = Peer(relay, UdpRelay(table, lambda ip: False, stats))
    inbox = asyncio.get_running_loop().create_task(serve_inbox(peer, args.inbox))
    print("ready", flush=True)
    while line := (await asyncio.to_thread(sys.stdin.readline)).split():
        if line[0] == "count":
            print(f"pairs {len(relay.pairs)}", flush=True)
        elif line[0] == "handover":
            relay.stop_accepting()
            messages = await export_connections(peer)  # type: ignore[arg-type]
            try:
                await asyncio.to_thread(send_messages, line[1], messages)
            finally:
                for message in messages:
                    for fd in message.fds:
                        os.close(fd)
            print(f"moved {len(messages)} left {len(relay.pairs)}", flush=True)
            cut = await relay.drain(args.drain)
            print(f"drained cut={cut}", flush=True)
    inbox.cancel()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", choices=["protocol", "splice"], default="protocol")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--idle", type=float, default=3600.0)
    parser.add_argument("--drain", type=float, default=10.0)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
