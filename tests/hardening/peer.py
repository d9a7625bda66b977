"""One relay process of the hardening driver: the relay under test, and what it reports.

`python -m tests.hardening.peer --relay engine|twin --loop uvloop|asyncio --port P --inbox PATH`
serves every Service of scenarios.py on 0.0.0.0:P with one relay (one listener: the route
is chosen by the address the client dialed, as with pyproxy's TPROXY listener), with the
real pure model behind it (ServiceTable, Balancer: uniform Services are served from the
engine's plans, `sticky` has ClientIP affinity). Hand-overs arrive on the unix socket PATH.

Commands on stdin, one JSON line answered on stdout per command (`tag {...}`):
- `probe`: open pairs, fds (all, TCP sockets not listening, pipes past stdio), RSS,
  Python's allocated blocks (after a full collection);
- `handover PATH SQUEEZE SEED`: stop accepting; with SQUEEZE >= 0 lower the soft fd limit
  so that only SQUEEZE new fds fit while the pairs are detached (the dups need fds: EMFILE may hit
  part-way), then restore it; send the pairs to PATH and finish as pyproxy's hand-over does;
  answer, drain what is left (pairs still dialing), answer again;
- `garbage N SEED`: N adopts of bad states on fresh sockets; every fd handed to adopt must
  be closed afterwards (or belong to a pair the relay took up, which is then closed);
- `exit`: drain, answer with a last probe, end (the sanitizer's leak check runs at exit).
Options: `--stall SEED` makes the event loop stall for a few ms now and then (events then
come in batches, as on a loaded node); `--sigpipe-default` leaves SIGPIPE at its default
action (CPython ignores it; the engine must not need that).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from pyproxy.dataplane import engine
from pyproxy.dataplane.connstate import DirectionState, TcpState
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import FastRelay
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.demo import manifests as m
from pyproxy.lifecycle.channel import Channel, Message, close_fds
from pyproxy.lifecycle.connections import adopt_connections, export_connections, export_finished
from pyproxy.model.objects import ServiceKey, ServicePortName, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable
from tests.hardening.scenarios import BACKEND_PORT, BACKENDS, ENDPOINTS, SERVICES


@dataclass
class Peer:
    relay: TcpRelay
    udp: UdpRelay


def build_table(port: int) -> ServiceTable:
    services, slices = [], []
    for i, (name, endpoints) in enumerate(ENDPOINTS.items()):
        cluster_ip = f"10.96.0.{i + 1}"
        doc = m.service(name, cluster_ip, [m.port(80, BACKEND_PORT)],
                        affinity_timeout=600 if name == "sticky" else None)
        services.append(parse_service(doc))
        slices.append(parse_endpoint_slice(m.endpoint_slice(
            name, [m.Backend(BACKENDS[e], "node1") for e in endpoints], [m.slice_port(BACKEND_PORT)])))
    store = ClusterStore()
    store.replace_all([s for s in services if s is not None], [s for s in slices if s is not None])
    table = ServiceTable("node1")
    table.update({ServiceKey("default", name) for name in ENDPOINTS}, store, ())
    for i, name in enumerate(ENDPOINTS):
        table.routes[(SERVICES[name], "TCP", port)] = table.routes[(f"10.96.0.{i + 1}", "TCP", 80)]
    return table


def fd_picture() -> dict[str, int]:
    """fds of this process: all, TCP sockets that are not listening, pipes (stdio aside)."""
    states: dict[str, str] = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{name}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                states[fields[9]] = fields[3]
    total = tcp = pipes = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        total += 1
        if target.startswith("socket:[") and states.get(target[8:-1], "0A") != "0A":
            tcp += 1
        elif target.startswith("pipe:[") and int(entry) > 2:
            pipes += 1
    return {"fds": total, "tcp": tcp, "pipes": pipes}


def limit_leaving(free: int) -> int:
    """The fd limit under which exactly `free` fd numbers are free (the limit bounds the
    numbers, not the count: fds open above it stay open, and new ones fill the holes)."""
    taken = {int(entry) for entry in os.listdir("/proc/self/fd")}
    fd = found = 0
    while fd in taken or found < free:
        found += fd not in taken
        fd += 1
    return fd


def probe(relay: TcpRelay) -> dict[str, Any]:
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"pairs": len(relay.pairs), **fd_picture(), "rss": rss, "blocks": sys.getallocatedblocks()}


def say(tag: str, body: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(body)}", flush=True)


def inbox_listener(path: str) -> socket.socket:
    """Bound before "ready" is said: a predecessor may connect at once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    return listener


async def serve_inbox(peer: Peer, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(True)
        channel = Channel(conn, timeout=30)
        messages = []
        while (message := await asyncio.to_thread(channel.receive)).kind != "end":
            messages.append(message)
        await adopt_connections(peer, messages)
        await asyncio.to_thread(channel.send, Message("done", {"adopted": True}))
        channel.close()
        say("adopted", {"messages": len(messages), "pairs": len(peer.relay.pairs)})


async def handover(peer: Peer, path: str, squeeze: int, seed: int) -> bool:
    relay = peer.relay
    relay.stop_accepting()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    error = ""
    messages: list[Message] = []
    try:
        if squeeze >= 0:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(squeeze), hard))
        messages = await export_connections(peer)
    except OSError as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if not error:
        channel = await asyncio.to_thread(Channel.connect, path, 30.0)
        await asyncio.to_thread(channel.send_all, [*messages, Message("end")])
        done = await asyncio.to_thread(channel.receive, False)
        channel.close()
        await export_finished(peer, bool(done.body.get("adopted")))
    say("handed", {"moved": len(messages), "left": len(relay.pairs), "error": error})
    cut = await relay.drain(60.0)
    say("drained", {"cut": cut, **probe(relay)})
    return True


def _garbage_state(kind: str, fds: list[int], port: int, port_name: ServicePortName) -> TcpState:
    state = TcpState(port_name, ("127.0.0.1", 40000), (SERVICES["plain"], port), (BACKENDS["a"], BACKEND_PORT),
                     0.0, 0.0, 0, 0, DirectionState(), DirectionState())
    if kind == "pipe-flag":  # a pipe announced, none sent
        return replace(state, up=DirectionState(pipe=True))
    if kind == "extra-fd":
        fds.append(os.dup(fds[0]))
        return state
    if kind == "bad-address":
        return replace(state, client=("999.1.2.3", 40000))
    r, w = os.pipe()
    fds += [r, w]
    return replace(state, down=DirectionState(pipe=True, in_pipe=-5))  # "bad-in-pipe"


async def garbage(relay: TcpRelay, count: int, seed: int, port: int, port_name: ServicePortName) -> dict[str, Any]:
    rng = random.Random(seed)
    leaked: list[str] = []
    taken = refused = 0
    for _ in range(count):
        kind = rng.choice(("pipe-flag", "extra-fd", "bad-address", "bad-in-pipe"))
        a, b = socket.socketpair()
        fds = [a.detach(), b.detach()]
        state = _garbage_state(kind, fds, port, port_name)
        identity = [(fd, os.fstat(fd).st_ino) for fd in fds]
        before = {getattr(p, "_id", id(p)) for p in relay.pairs}
        try:
            await relay.adopt_pair(state, list(fds))
            taken += 1
        except Exception:
            refused += 1
        for pair in list(relay.pairs):
            if getattr(pair, "_id", id(pair)) not in before:
                pair.close(abort=True)
        for fd, inode in identity:
            try:
                still = os.fstat(fd).st_ino == inode
            except OSError:
                continue
            if still:
                leaked.append(kind)
                os.close(fd)
    return {"tried": count, "taken": taken, "refused": refused, "leaked": leaked}


def stall(loop: asyncio.AbstractEventLoop, rng: random.Random) -> None:
    time.sleep(rng.uniform(0.001, 0.02))
    loop.call_later(rng.uniform(0.01, 0.1), stall, loop, rng)


async def main_async(args: argparse.Namespace) -> None:
    table = build_table(args.port)
    port_name = table.routes[(SERVICES["plain"], "TCP", args.port)].port.name
    stats = DataplaneStats()
    config = RelayConfig(dial_timeouts=tuple(float(t) for t in args.dial_timeouts.split(",")))
    relay: TcpRelay = (engine.NativeRelay(table, lambda ip: False, stats, config) if args.relay == "engine"
                       else FastRelay(table, lambda ip: False, stats, config))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(1024)
    await relay.start("0.0.0.0", args.port, listener)
    peer = Peer(relay, UdpRelay(table, lambda ip: False, stats))
    loop = asyncio.get_running_loop()
    inbox = loop.create_task(serve_inbox(peer, inbox_listener(args.inbox)))
    if args.stall is not None:
        loop.call_later(0.05, stall, loop, random.Random(args.stall))
    say("ready", {"kind": relay.kind, **probe(relay)})
    drained = False
    while line := (await asyncio.to_thread(sys.stdin.readline)).split():
        if line[0] == "probe":
            say("probe", probe(relay))
        elif line[0] == "handover":
            drained = await handover(peer, line[1], int(line[2]), int(line[3]))
        elif line[0] == "garbage":
            say("garbage", await garbage(relay, int(line[1]), int(line[2]), args.port, port_name))
        elif line[0] == "exit":
            cut = 0 if drained else await relay.drain(10.0)
            say("exit", {"cut": cut, **probe(relay)})
            break
    inbox.cancel()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", choices=["engine", "twin"], default="engine")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--dial-timeouts", default="1.0,0.5,1.0,2.0")
    parser.add_argument("--stall", type=int, default=None, help="stall the event loop now and then (seed)")
    parser.add_argument("--sigpipe-default", action="store_true")
    args = parser.parse_args()
    if args.sigpipe_default:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.relay == "engine" and not engine.AVAILABLE:
        print("error the compiled engine is not built", flush=True)
        return 2
    if args.loop == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
