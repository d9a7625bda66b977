"""`python -m bench.run`: the contenders of shared/BENCH.md side by side, in namespaces.

Rules kept here:
- Contenders are interleaved within each workload (A B C A B C ...) for `--rounds` rounds
  (>= 5 for a full run); workloads run in order, crr before the latency rates derived from it.
- Everything made is unmade: namespaces (prefix `pb<pid>-`) and the processes this run started
  are removed in `finally`, on errors, Ctrl-C and SIGTERM alike. Only this run's PIDs are
  signalled; the root namespace's firewall and routes are never touched.
- A contender that cannot be started or does not become ready within its bound is skipped and
  the reason recorded; the run carries on (pyproxy may not work yet).
- Output dir gets results.json (everything), results.md (tables) and results.png (plot),
  plus work/ (configs, logs, raw load results). Written even for an interrupted run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench.loadtool.backend import raise_nofile_limit
from bench.reporting import render, summary
from bench.runner import contenders as ct
from bench.runner import procs, topology, workloads
from bench.runner.harness import Harness

REPO = Path(__file__).resolve().parents[2]  # bench/runner/run.py -> the repo root
TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "socat": "socat", "dnat": "nft"}
FULL_CONTENDERS = "direct,dnat,haproxy,nginx,socat,pyproxy,pyproxy-pure,pyproxy-2w"
QUICK_CONTENDERS = "direct,dnat,haproxy-1t,nginx-1w,pyproxy,pyproxy-2w"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="pyproxy vs the alternatives, side by side")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 3 rounds, short, fewer contenders; < 5 min")
    p.add_argument("--rounds", type=int, help="interleaved repetitions (default 5, quick 3)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 5, quick 1)")
    p.add_argument("--contenders", default=None,
                   help=f"families or ids, comma-separated (default {FULL_CONTENDERS}; quick {QUICK_CONTENDERS})")
    p.add_argument("--workloads", default="", help="workload names or modes, comma-separated (default all)")
    p.add_argument("--idle-conns", type=int, help="connections held by the idle workload (default 10000, quick 1000)")
    p.add_argument("--backends", type=int, default=2, help="backend namespaces (default 2)")
    p.add_argument("--sources", type=int, default=32, help="client source addresses (default 32)")
    p.add_argument("--latency-ref", type=float, default=5000.0,
                   help="crr rate the latency fractions apply to when no crr was measured")
    p.add_argument("--pin", action="store_true", help="proxies on CPU 0, load and backends on CPU 1")
    p.add_argument("--proxy-cores", type=float, default=0.0,
                   help="cap each proxy at this many cores per thread/worker (a cpu cgroup of its own), "
                        "so the load keeps cores to spare")
    p.add_argument("--out", help="output directory (default bench/out/<UTC timestamp>)")
    return p


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "absent"


def machine_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    import uvloop

    return (f"Linux {platform.release()}, {cpu} x{os.cpu_count()}, Python {platform.python_version()}, "
            f"uvloop {getattr(uvloop, '__version__', '?')}, {' '.join(_version(['haproxy', '-v']).split()[:3])}, "
            f"{_version(['nginx', '-v'])}, socat {_socat_version()}, {_version(['nft', '--version'])}")


def _socat_version() -> str:
    line = next((x for x in _version_lines(["socat", "-V"]) if x.startswith("socat version")), "")
    return line.split()[2] if len(line.split()) > 2 else "absent"


def _version_lines(argv: list[str]) -> list[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _log(msg: str) -> None:
    print(f"[bench.run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _brief(m: summary.Measurement) -> str:
    if m.error:
        return f"FAILED: {m.error[:160]}"
    f = summary.figures(m)
    head = summary.HEADLINE.get(m.mode, "ops_per_s")
    cpu = f" proxy {m.proxy_cpu_s:.2f} cpu-s" if m.proxy_cpu_s is not None else ""
    return f"{head}={render.fmt_num(f.get(head))} p99={render.fmt_num(f.get('p99_ms'))} ms errors={f['errors']:.0f}{cpu}"


def start_all(h: Harness, chosen: list[ct.Contender], skipped: dict[str, str]) -> list[ct.Contender]:
    """Start the persistent contenders and check every one once; returns the usable ones."""
    for c in chosen:
        tool = TOOLS.get(c.family)
        if tool and shutil.which(tool) is None:
            skipped[c.id] = f"{tool} is not installed"
            continue
        if not c.exclusive:
            h.start(c)
        error = h.activate(c)
        h.deactivate(c)
        if error:
            skipped[c.id] = error
            h.stop(c)
        _log(f"contender {c.id}: {'ready' if not error else 'SKIPPED: ' + error[:300]}")
    return [c for c in chosen if c.id not in skipped]


def run_rounds(h: Harness, active: list[ct.Contender], loads: list[workloads.Workload], rounds: int,
               latency_ref: float, measurements: list[summary.Measurement]) -> None:
    for w in loads:
        if w.mode == "control":
            if any(c.family == "pyproxy" for c in active):
                m = h.measure_control(w)
                measurements.append(m)
                _log(f"{w.name}: {_brief(m)}")
            continue
        if w.mode in ("restart", "crash"):  # once per contender that can be restarted
            for c in active:
                if c.family not in ("pyproxy", "dnat") or (w.contenders and c.id not in w.contenders):
                    continue
                error = h.activate(c)
                m = (summary.Measurement(w.name, w.mode, c.id, 1, error=f"not ready: {error}") if error
                     else h.measure_restart(c, w))
                h.deactivate(c)
                measurements.append(m)
                _log(f"{w.name} {c.id}: {_brief(m)}")
            continue
        rate = None
        if w.rate_fraction:
            ref = summary.reference_rate(summary.aggregate(measurements), workload=w.ref) or latency_ref
            rate = max(1.0, ref * w.rate_fraction)
        serving = [c for c in active if c.target_for(w.port) is not None]  # socat: the bench port only
        for r in range(1, rounds + 1):
            for c in serving:
                error = h.activate(c, w.mode)
                m = (summary.Measurement(w.name, w.mode, c.id, r, error=f"not ready: {error}") if error
                     else h.measure(c, w, r, rate))
                h.deactivate(c)
                measurements.append(m)
                _log(f"{w.name} round {r}/{rounds} {c.id}: {_brief(m)}")


def write_outputs(out: Path, meta: dict[str, Any], chosen: list[ct.Contender], skipped: dict[str, str],
                  loads: list[workloads.Workload], measurements: list[summary.Measurement]) -> None:
    cells = summary.aggregate(measurements)
    names = [c.id for c in chosen if c.id not in skipped]
    names += list(dict.fromkeys(m.contender for m in measurements if m.contender not in names))  # control: "pyproxy"
    doc = {"meta": meta, "contenders": [c.id for c in chosen], "skipped": skipped,
           "workloads": [asdict(w) for w in loads], "measurements": [asdict(m) for m in measurements],
           "cells": [{"workload": c.workload, "mode": c.mode, "contender": c.contender, "rounds": c.rounds,
                      "failures": c.failures, "errors": list(c.errors),
                      "stats": {k: v.to_dict() for k, v in c.stats.items()}} for c in cells]}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "results.md").write_text(render.markdown(meta, cells, names, skipped))
    if cells:
        render.write_plot(out / "results.png", cells, names, f"pyproxy bench {meta['started']} ({meta['rounds']} rounds)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 5.0)
    raise_nofile_limit(524288)  # inherited by every process started: haproxy, nginx, load
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # BENCH.md asks for 10k idle connections; a one-process proxy needs two sockets for each,
    # so where the hard open-files limit is lower (20000 here, without CAP_SYS_RESOURCE) hold less.
    idle = args.idle_conns or (1000 if args.quick else min(10000, ct.max_proxied(nofile) - 100))
    try:
        loads = workloads.select(workloads.quick(duration, idle) if args.quick else workloads.full(duration, idle),
                                 args.workloads)
        topo = topology.Topology(f"pb{os.getpid()}-", args.backends, args.sources)
    except ValueError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = Path(args.out) if args.out else REPO / "bench" / "out" / started.replace(":", "")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    backends = [(topo.backend_addr(i), ct.BACKEND_PORT) for i in topo.backend_ids]
    try:
        chosen = ct.select(ct.build(ct.FAMILIES, topology.NODE_ADDR, backends, work, nofile=nofile,
                                    node_ns=topo.node_ns),
                           args.contenders or (QUICK_CONTENDERS if args.quick else FULL_CONTENDERS))
    except ValueError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # even where SIGINT came ignored
        signal.signal(sig, _on_signal)
    registry = procs.Registry()
    measurements: list[summary.Measurement] = []
    skipped: dict[str, str] = {}
    made: list[str] = []
    meta: dict[str, Any] = {"started": started, "machine": machine_line(), "rounds": rounds, "quick": args.quick,
                            "duration_s": duration, "prefix": topo.prefix, "nofile": nofile, "idle_conns": idle,
                            "wall_s": 0.0, "interrupted": False}
    t0 = time.monotonic()
    status = 0
    h: Harness | None = None
    try:
        topology.create(topo, made)
        h = Harness(topo, work, registry, REPO, args.pin, args.proxy_cores)
        h.start_backends()
        _log(f"topology {topo.prefix}* up, {len(backends)} backends ready; output {out}")
        active = start_all(h, chosen, skipped)
        run_rounds(h, active, loads, rounds, args.latency_ref, measurements)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        status = 130
        _log("interrupted: tearing down")
    except Exception as exc:  # recorded, then torn down like any other end
        meta["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
        _log(f"failed: {meta['error']}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # teardown is bounded; let it finish
        registry.stop_all()
        leftovers = topology.destroy(made) + (h.remove_cgroups() if h is not None else [])
        for c in chosen:
            if c.family == "pyproxy":
                shutil.rmtree(ct.state_dir(c.id), ignore_errors=True)
        meta["teardown_errors"] = leftovers
        meta["wall_s"] = time.monotonic() - t0
        write_outputs(out, meta, chosen, skipped, loads, measurements)
        _log(f"done in {meta['wall_s']:.0f} s; wrote {out}/results.{{json,md,png}}")
    return status


if __name__ == "__main__":
    sys.exit(main())
