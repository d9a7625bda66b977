"""One relay process for the connection-moving tests: relays, hands over, takes over.

Run in a test's namespace: `python -m tests.kernel.move_peer --relay engine|twin
--loop uvloop|asyncio --listen IP:PORT --endpoint IP:PORT --inbox PATH`. It serves one
Service whose endpoint is `--endpoint` on `--listen` (no TPROXY needed: the listen address
itself is routed as a frontend), and accepts hand-overs on the unix socket `--inbox`.
On stdin, `handover PATH` exports every connection (pyproxy.lifecycle.connections), sends
the messages to PATH (pyproxy.lifecycle.channel: JSON, fds with SCM_RIGHTS; the `end` and
`done` steps of the hand-over), closes its dups once the peer took them up, prints
`moved N left M`, drains what is left and prints `drained cut=K`. Each hand-over received
prints `adopted N` (with `--refuse` it adopts nothing and answers so, as a release
without the hooks would). `count` prints `pairs N`; EOF on stdin ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from dataclasses import dataclass

from pyproxy.dataplane import engine
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import FastRelay
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.lifecycle.channel import Channel, Message, close_fds
from pyproxy.lifecycle.connections import adopt_connections, export_connections, export_finished
from pyproxy.model.objects import ServiceKey, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable

SERVICE = ("10.96.0.1", 80)


@dataclass
class Peer:
    """What the hooks need of an app: its relays."""

    relay: TcpRelay
    udp: UdpRelay


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


async def serve_inbox(peer: Peer, path: str, refuse: bool) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(True)
        channel = Channel(conn)
        messages = []
        while (message := await asyncio.to_thread(channel.receive)).kind != "end":
            messages.append(message)
        if refuse:  # as a release that cannot adopt connections: closes what it got
            for message in messages:
                close_fds(message.fds)
        else:
            await adopt_connections(peer, messages)  # type: ignore[arg-type]
        await asyncio.to_thread(channel.send, Message("done", {"adopted": not refuse}))
        channel.close()
        print(f"adopted {len(messages)}", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    listen = _address(args.listen)
    table = table_for(listen, _address(args.endpoint))
    stats = DataplaneStats()
    config = RelayConfig(idle_timeout=args.idle, half_close_timeout=args.idle)
    relay: TcpRelay = (engine.NativeRelay(table, lambda ip: False, stats, config) if args.relay == "engine"
                       else FastRelay(table, lambda ip: False, stats, config))
    await relay.start(*listen)
    peer = Peer(relay, UdpRelay(table, lambda ip: False, stats))
    inbox = asyncio.get_running_loop().create_task(serve_inbox(peer, args.inbox, args.refuse))
    print("ready", flush=True)
    while line := (await asyncio.to_thread(sys.stdin.readline)).split():
        if line[0] == "count":
            print(f"pairs {len(relay.pairs)}", flush=True)
        elif line[0] == "handover":
            relay.stop_accepting()
            messages = await export_connections(peer)  # type: ignore[arg-type]
            channel = await asyncio.to_thread(Channel.connect, line[1])
            await asyncio.to_thread(channel.send_all, [*messages, Message("end")])
            done = await asyncio.to_thread(channel.receive, False)
            channel.close()
            await export_finished(peer, bool(done.body.get("adopted")))  # type: ignore[arg-type]
            print(f"moved {len(messages)} left {len(relay.pairs)}", flush=True)
            cut = await relay.drain(args.drain)
            print(f"drained cut={cut}", flush=True)
    inbox.cancel()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", choices=["engine", "twin"], default="engine",
                        help="the compiled engine (engine.NativeRelay) or its pure-Python twin (splice.FastRelay)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--idle", type=float, default=3600.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--refuse", action="store_true", help="answer hand-overs with adopted=false")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
