"""`python -m bench.relayrig`: one pyproxy TCP relay with a one-service table, no kernel rules.

For profiling the byte path and for data-integrity tests without nftables or TPROXY: the
relay listens on HOST:PORT (a plain listener also carries IP_TRANSPARENT, harmless), and the
table routes that very address to the given backends, exactly as a captured ClusterIP would
be routed (the accepted socket's local address is the destination either way).

Rules kept here: it runs until SIGTERM/SIGINT (then drains up to 5 s), or for --seconds;
`--profile FILE` writes a cProfile of the whole run.

Usage: python -m bench.relayrig --relay splice --listen 127.0.0.1:15001 --backend 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import signal
import sys
import threading
import time
from typing import Any

from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import DEFAULT_SPLICE_AFTER, make_splice_relay
from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.model.affinity import Balancer
from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.objects import ServiceKey, ServicePortName
from pyproxy.model.table import PortState, Route, ServiceTable


def one_service_table(listen: tuple[str, int], backends: list[tuple[str, int]], affinity: int | None) -> ServiceTable:
    table = ServiceTable("node1")
    name = ServicePortName(ServiceKey("default", "rig"), "", "TCP")
    eps = tuple(Endpoint(h, p, True, True, False, False) for h, p in backends)
    port = PortState(name, EndpointSets(eps, eps, ()), affinity, False, False)
    table.routes[(listen[0], "TCP", listen[1])] = Route(port, external=False)
    table.ports[name] = port
    balancer = Balancer(65536)
    balancer.configure(affinity, [e.address for e in eps])
    table.balancers[name] = balancer
    return table


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    listen = _addr(args.listen)
    table = one_service_table(listen, [_addr(b) for b in args.backend], args.affinity)
    config = RelayConfig(idle_timeout=args.idle_timeout, half_close_timeout=args.half_close_timeout)
    relay: TcpRelay = make_splice_relay(table, lambda ip: False, DataplaneStats(), config,
                                        splice_after=args.splice_after)
    await relay.start(*listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.engine_thread:  # an experiment: the engine waits in a thread of its own, not nested in the loop's epoll
        engine = getattr(relay, "engine", None)
        if engine is None:
            raise SystemExit("--engine-thread needs the compiled engine")
        loop.remove_reader(engine.fileno())
        threading.Thread(target=_engine_loop, args=(engine, args.seconds), daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"relayrig {relay.kind} on {args.listen}", file=sys.stderr, flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.seconds)
    except TimeoutError:
        pass
    relay.stop_accepting()
    await relay.drain(5.0)


def _engine_loop(engine: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        engine.run(100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relayrig")
    p.add_argument("--relay", choices=("splice",), default="splice",
                   help="the relay kind: splice is the only one (the option stays, so `--relay splice` parses)")
    p.add_argument("--listen", default="127.0.0.1:15001")
    p.add_argument("--backend", action="append", required=True, help="HOST:PORT (repeatable)")
    p.add_argument("--splice-after", type=int, default=DEFAULT_SPLICE_AFTER)
    p.add_argument("--affinity", type=int, default=None, help="ClientIP affinity timeout (s)")
    p.add_argument("--idle-timeout", type=float, default=3600.0)
    p.add_argument("--half-close-timeout", type=float, default=300.0)
    p.add_argument("--engine-thread", action="store_true",
                   help="experiment: run the compiled engine's epoll in a thread of its own (static table only)")
    p.add_argument("--seconds", type=float, default=3600.0, help="bound on the run")
    p.add_argument("--profile", help="write a cProfile here")
    args = p.parse_args(argv)
    import uvloop

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        try:
            uvloop.run(serve(args))
        finally:
            prof.disable()
            prof.dump_stats(args.profile)
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
