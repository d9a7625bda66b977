"""`python -m bench.firstsync`: the first sync's own work at N Services, in one process, step by step.

What the scale bench's "first sync" costs pyproxy, without an API server: the objects are
built as the API server returns them (the scale bench's shapes, with the fields the server
adds), then timed in the order the proxy meets them: JSON decoding of the list pages,
parsing into the store (the watch threads' work, a page at a time), `ServiceTable.update` over every Service,
the nftables text, and (root, `--nft`) that text applied by `nft -f` and by libnftables in a
network namespace made for the run and deleted after it. `--profile FILE` writes a cProfile of the table update and the
text (pstats). Nothing here touches the root namespace's firewall.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from bench.rigs.scaleapi import filler_addresses, filler_ip, service_body, slice_body

T = TypeVar("T")
NODE = "node1"


def api_service(i: int) -> dict[str, Any]:
    body = service_body(f"s{i}")
    k = i + 1  # 10.96.0.0/16 without .0
    ip = f"10.96.{k >> 8}.{k & 255}" if k < 65535 else filler_ip(i)
    body["metadata"].update(uid=str(uuid.UUID(int=i)), resourceVersion=str(1000 + i),
                            creationTimestamp="2026-12-07T20:00:00Z")
    body["spec"].update(clusterIP=ip, clusterIPs=[ip], ipFamilies=["IPv4"], ipFamilyPolicy="SingleStack",
                        sessionAffinity="None", internalTrafficPolicy="Cluster")
    body["status"] = {"loadBalancer": {}}
    return body


def api_slice(i: int) -> dict[str, Any]:
    body = slice_body(f"s{i}", filler_addresses(i))
    body["metadata"].update(uid=str(uuid.UUID(int=10**6 + i)), resourceVersion=str(50000 + i),
                            generation=1, creationTimestamp="2026-12-07T20:00:00Z")
    return body


class CollectorClock:
    """CPU time spent inside the cyclic garbage collector (gc.callbacks), in total."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started


def timed(label: str, fn: Callable[[], T], results: dict[str, float]) -> T:
    """Run fn; record the CPU time it took (this process's: steadier than the wall clock on a
    shared machine; `nft -f` runs in a child, so its wall time is recorded instead)."""
    clock = time.perf_counter if label.startswith("nft") else time.process_time
    in_gc = COLLECTOR.seconds
    started = clock()
    value = fn()
    results[label] = clock() - started
    results[f"{label}: in the collector"] = COLLECTOR.seconds - in_gc
    return value


COLLECTOR = CollectorClock()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--profile", help="write a cProfile (pstats) of the table update + nft text here")
    p.add_argument("--nft", action="store_true", help="also run nft -f in a namespace made for it (root)")
    p.add_argument("--json", help="write the timings here")
    p.add_argument("--no-freeze", action="store_true", help="leave the collector alone (before pyproxy/heap.py)")
    args = p.parse_args(argv)

    from pyproxy.dataplane.nft import NftConfig, render_ruleset
    from pyproxy.model.objects import parse_endpoint_slice, parse_service
    from pyproxy.model.store import ClusterStore
    from pyproxy.model.table import ServiceTable

    n, results = args.services, dict[str, float]()
    pages = [json.dumps({"items": [api_service(i) for i in range(s, min(n, s + 500))]}).encode()
             for s in range(0, n, 500)]
    pages += [json.dumps({"items": [api_slice(i) for i in range(s, min(n, s + 500))]}).encode()
              for s in range(0, n, 500)]
    settle: Callable[[], None] = lambda: None
    building: Callable[[], Any] = contextlib.nullcontext
    if not args.no_freeze:
        try:  # as the proxy does; a tree from before pyproxy/heap.py has none (main's)
            from pyproxy.heap import settle
        except ImportError:
            pass
        try:
            from pyproxy.heap import building
        except ImportError:
            pass

    def parse(pages: list[bytes], parser: Callable[[Any], Any]) -> list[Any]:
        parsed: list[Any] = []
        for page in pages:  # the watch thread's list: decode a page, parse its items, settle
            parsed += [parser(o) for o in json.loads(page)["items"]]
            settle()
        return parsed

    half = len(pages) // 2
    services = timed("decode + parse services", lambda: parse(pages[:half], parse_service), results)
    slices = timed("decode + parse slices", lambda: parse(pages[half:], parse_endpoint_slice), results)
    store = ClusterStore()
    store.replace_all([s for s in services if s], [s for s in slices if s])
    table = ServiceTable(NODE, rng=random.Random(1))
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    changed = timed("store.take_changes", store.take_changes, results)
    def update() -> None:
        with building():  # the proxier's full sync pauses the collector (pyproxy/heap.py)
            table.update(changed, store, ("192.168.56.11",))

    timed("ServiceTable.update", update, results)
    config = NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001)
    text = timed("render_ruleset", lambda: render_ruleset(config, table.all_elements(), table.all_allows()), results)
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
    if args.nft:
        ns = f"firstsync-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            timed("nft -f (full table)", lambda: subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
                                                               input=text.encode(), check=True), results)
            code = ("import sys, time; from pyproxy.dataplane.libnft import LibNftRunner, load_library; "
                    "r = LibNftRunner(load_library()); t = time.process_time(); r.apply_now(sys.stdin.read()); "
                    "print(time.process_time() - t)")
            done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], input=text,
                                  capture_output=True, text=True, check=False)
            if done.returncode == 0:  # a tree from before dataplane/libnft.py has none
                results["libnftables (full table, CPU)"] = float(done.stdout)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    sync = sum(v for k, v in results.items() if not k.startswith(("decode", "nft")) and "collector" not in k)
    for label, seconds in results.items():
        print(f"{label:50s} {seconds * 1000:8.0f} ms")
    print(f"{'the sync (take, update, text, libnftables)':50s} {sync * 1000:8.0f} ms   ({len(text) / 1e6:.1f} MB of nft text)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"services": n, "seconds": results, "sync": sync}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
