"""`python -m bench.controlplane`: time from an endpoint change to the next connection routed by it.

Run as root inside a namespace of its own (the runner uses its node namespace), with the
backends reachable at `--backends`. It assembles pyproxy's real pieces in one process: the
cluster store, the service table, the proxier writing the real nftables table (incremental
set-element updates after the first full write), policy routing, the sync runner with
pyproxy's default minimum sync period, and the splice relay on the TPROXY port. Then:

- Load `--services` Services (each with a ClusterIP and a one-endpoint EndpointSlice), plus
  the bench Service 10.96.0.10:80 on the first backend; time the first full sync.
- `--changes` times: move the bench Service's EndpointSlice to the other backend, exactly as
  a watch event would change the store, nudge the runner, and then connect to the
  ClusterIP (from the node itself: output chain -> lo -> TPROXY -> relay) every few
  milliseconds until the backend's own name (`N` mode) says the new endpoint answered.
  The latency of one change = that answer's arrival - the store change (includes the sync,
  the nft write and one connection's round trip). HDR histogram, p50/p90/p99/max.
- Every loop is bounded in time and count; the nft table and the policy routing are
  removed at the end (the namespace goes away with the run anyway).

What this does *not* include is the source's own delay: the API server's watch (cluster
mode), or re-reading manifest files (standalone mode re-parses every file on a change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from typing import Any

from bench.loadtool import protocol as proto
from bench.loadtool.results import Recorder, percentiles_ms

SERVICE_IP = "10.96.0.10"
SERVICE_CIDR = "10.96.0.0/16"
NODE_NAME = "node1"
MARK, ROUTE_TABLE, RULE_PRIORITY, PROXY_PORT = 0x200000, 2010, 9000, 15001


def service_doc(name: str, ip: str, target: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "", "protocol": "TCP", "port": 80, "targetPort": target}]}}


def slice_doc(service: str, ip: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": f"{service}-1",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node2"}]}


def filler_ip(i: int) -> str:
    return f"10.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


async def _ask_name(timeout: float) -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (SERVICE_IP, 80))
            await loop.sock_sendall(sock, proto.name().pack())
            data = b""
            while True:
                chunk = await loop.sock_recv(sock, 256)
                if not chunk:
                    return data.decode(errors="replace").strip()
                data += chunk
    finally:
        sock.close()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from pyproxy.dataplane.nft import NftConfig, NftRunner, render_cleanup
    from pyproxy.dataplane.routing import PolicyRouting
    from pyproxy.dataplane.splice import make_splice_relay
    from pyproxy.dataplane.stats import DataplaneStats
    from pyproxy.model.objects import parse_endpoint_slice, parse_service
    from pyproxy.model.store import ClusterStore
    from pyproxy.model.table import ServiceTable
    from pyproxy.proxier import Proxier
    from pyproxy.sync import SyncRunner

    backends = [(h, int(p)) for h, _, p in (b.rpartition(":") for b in args.backends.split(","))]
    names = [f"be{i}" for i in range(1, len(backends) + 1)]
    store = ClusterStore()
    services = [parse_service(service_doc("bench", SERVICE_IP, backends[0][1]))]
    slices = [parse_endpoint_slice(slice_doc("bench", *backends[0]))]
    for i in range(args.services):
        services.append(parse_service(service_doc(f"svc-{i}", filler_ip(i), 8080)))
        slices.append(parse_endpoint_slice(slice_doc(f"svc-{i}", f"10.250.{i // 250 % 250}.{i % 250 + 1}", 8080)))
    store.replace_all([s for s in services if s], [s for s in slices if s])
    table = ServiceTable(NODE_NAME, rng=random.Random())
    syncs: list[float] = []
    proxier = Proxier(store=store, table=table, nft=NftRunner(),
                      nft_config=NftConfig(mark=MARK, tcp_port=PROXY_PORT, udp_port=PROXY_PORT),
                      node_addresses=lambda: [args.node_address],
                      on_synced=lambda result: syncs.append(result.seconds))
    routing = PolicyRouting(mark=MARK, table=ROUTE_TABLE, priority=RULE_PRIORITY)
    await asyncio.to_thread(routing.install)
    # the node's own connections need *a* route to the service range before nft re-routes them
    subprocess.run(["ip", "route", "replace", SERVICE_CIDR, "dev", "lo", "src", args.node_address], capture_output=True, timeout=30)
    relay = make_splice_relay(table, proxier.is_local_source, DataplaneStats())
    await relay.start("127.0.0.1", PROXY_PORT)
    runner = SyncRunner(proxier.sync, args.min_sync_period, 30.0)
    stop = asyncio.Event()
    runner_task = asyncio.create_task(runner.run(stop), name="sync-runner")
    latency, errors = Recorder(), {"timeout": 0, "error": 0}
    t_full = time.monotonic()
    runner.request()
    try:
        deadline = time.monotonic() + 120
        while not syncs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        full_sync_s = time.monotonic() - t_full
        if not syncs:
            raise RuntimeError("the first sync did not finish in 120 s")
        current = await _ask_name(5.0)
        started = time.monotonic()
        for k in range(args.changes):
            if time.monotonic() - started > args.bound:
                break
            await asyncio.sleep(args.gap)
            target = (names.index(current) + 1) % len(names) if current in names else 0
            new_slice = parse_endpoint_slice(slice_doc("bench", *backends[target]))
            assert new_slice is not None
            t0 = time.monotonic()
            store.upsert_slice(new_slice.key, new_slice)
            runner.request()
            seen = ""
            while time.monotonic() - t0 < args.timeout:
                try:
                    seen = await _ask_name(1.0)
                except (OSError, TimeoutError):
                    errors["error"] += 1
                    await asyncio.sleep(0.002)
                    continue
                if seen == names[target]:
                    break
                await asyncio.sleep(0.002)
            if seen == names[target]:
                latency.record(time.monotonic() - t0)
                current = seen
            else:
                errors["timeout"] += 1
        result = {
            "mode": "control", "services": args.services + 1, "changes": args.changes,
            "full_sync_s": full_sync_s, "latency_ms": percentiles_ms(latency.encoded()),
            "incremental_sync_ms": sorted(round(s * 1000, 2) for s in syncs[1:])[-5:],
            "ops": latency.histogram().get_total_count(), "errors": {k: v for k, v in errors.items() if v},
            "error_total": sum(errors.values()), "min_sync_period_s": args.min_sync_period,
        }
    finally:
        stop.set()
        await asyncio.gather(runner_task, return_exceptions=True)
        relay.stop_accepting()
        await relay.drain(1.0)
        subprocess.run(["nft", "-f", "-"], input=render_cleanup(), text=True, capture_output=True, timeout=30)
        await asyncio.to_thread(routing.remove)
        subprocess.run(["ip", "route", "del", SERVICE_CIDR, "dev", "lo"], capture_output=True, timeout=30)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.controlplane")
    p.add_argument("--services", type=int, default=10000, help="filler Services besides the bench one")
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--backends", default="10.201.1.2:8080,10.201.2.2:8080")
    p.add_argument("--node-address", default="10.200.0.1")
    p.add_argument("--gap", type=float, default=0.25, help="seconds between changes")
    p.add_argument("--timeout", type=float, default=5.0, help="bound on one change's wait")
    p.add_argument("--bound", type=float, default=120.0, help="bound on the whole series (s)")
    p.add_argument("--min-sync-period", type=float, default=0.1, help="pyproxy's default minSyncPeriod")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.services <= 60000 or not 1 <= args.changes <= 10000:
        print("bench.controlplane: --services in [0, 60000], --changes in [1, 10000]", file=sys.stderr)
        return 2
    import uvloop

    result = uvloop.run(measure(args))
    if args.json:
        print(json.dumps({"summary": result}, indent=1))
    else:
        lat = result["latency_ms"]
        print(f"{result['services']} services: full sync {result['full_sync_s'] * 1000:.0f} ms; change -> routed "
              f"p50 {lat.get('p50', 0):.1f} p90 {lat.get('p90', 0):.1f} p99 {lat.get('p99', 0):.1f} "
              f"max {lat.get('max', 0):.1f} ms over {result['ops']} changes; errors {result['errors'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
