"""`python -m bench.cload TOOL --target HOST:PORT --duration S [--rate R] --json`: a C/Go load
generator, run once, its output turned into the bench load tool's summary shape.

Why: the bundled load tool is Python, and its own CPU can cap (and so hide) a proxy's rate.
wrk, iperf3 and fortio cost the client a fraction of that, so these figures show the proxy.

Tools (what they drive; the backends serve them, see bench/runner/contenders.py):
- `wrk-rr`: wrk, 16 kept-alive HTTP/1.1 connections, 2 threads: requests/s and latency
  (p50/p75/p90/p99 from wrk's --latency).
- `wrk-crr`: the same with `Connection: close`: one TCP connection per request (the backend
  closes first, so TIME_WAIT stays off the client's ports).
- `fortio-max`: fortio as fast as it goes (`-qps 0`), 16 connections, no keep-alive: the
  connection rate fortio itself can drive through a proxy on this machine. The fixed rates
  of `latency@N%-fortio-max` are fractions of HAProxy's figure here, so that they measure
  the proxy rather than how much CPU fortio (dearer per request than wrk) leaves it.
- `fortio-crr`: fortio at a fixed rate (`--rate`), 16 connections, no keep-alive, no
  catch-up (`-nocatchup`: a slow proxy loses rate rather than bunching requests): the rate
  kept and p50/p90/p99/p99.9/max. fortio times each request from its actual send, so a
  proxy that falls behind shows as lost rate (`rate_kept`), which is reported beside p99.
- `iperf3`: one TCP stream for the duration: Gbit/s received.

Rules kept here:
- The parsers are pure functions of the tool's output text (unit-tested); the runner is one
  subprocess with a hard timeout (duration + 30 s), its CPU taken from RUSAGE_CHILDREN.
- The JSON printed is {"summary": {...}} with the keys bench.reporting.summary reads: window_s,
  ops_per_s, gbit_per_s, error_total, errors, client_cpu_s, latency_ms {p50, p90, p99, ...}.
- A tool that is missing or fails prints its error on stderr and exits 1 (the runner records
  the measurement as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TOOLS = ("wrk-rr", "wrk-crr", "fortio-max", "fortio-crr", "iperf3")
MODES = {"wrk-rr": "rr", "wrk-crr": "crr", "fortio-max": "crr", "fortio-crr": "latency", "iperf3": "stream"}
BIN_BENCH = Path(os.environ.get("PYPROXY_CACHE", "/var/cache/pyproxy")) / "bin-bench"
CONNS = 16
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def tool_path(name: str) -> str | None:
    """wrk and iperf3 from PATH (Debian); fortio from the bench's own build cache."""
    if name == "fortio":
        built = BIN_BENCH / "fortio"
        return str(built) if built.exists() else shutil.which("fortio")
    return shutil.which(name)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"wrk: not a duration: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's text report (with --latency) -> summary."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
    if not m:
        raise ValueError(f"wrk: no request count in its output: {out[-300:]!r}")
    ops, window = int(m.group(1)), _ms(m.group(2) + m.group(3)) / 1000
    latency = {f"p{p}": _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M)}
    errors: dict[str, int] = {}
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), e.groups()) if int(v)}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        errors["non_2xx"] = int(bad.group(1))
    return {"window_s": window, "ops": ops, "ops_per_s": ops / window if window else 0.0, "gbit_per_s": 0.0,
            "errors": errors, "error_total": sum(errors.values()), "latency_ms": latency}


def parse_fortio(doc: dict[str, Any]) -> dict[str, Any]:
    """fortio's -json result -> summary (with the requested rate and the share of it kept)."""
    hist = doc["DurationHistogram"]
    window = float(doc["ActualDuration"]) / 1e9
    codes = {str(k): int(v) for k, v in (doc.get("RetCodes") or {}).items()}
    ok = codes.get("200", 0)
    total = int(hist["Count"])
    latency = {f"p{float(p['Percentile']):g}": float(p["Value"]) * 1000 for p in hist.get("Percentiles") or []}
    latency["max"] = float(hist["Max"]) * 1000
    errors = {f"code_{k}": v for k, v in codes.items() if k != "200"}
    if total - sum(codes.values()) > 0:
        errors["other"] = total - sum(codes.values())
    try:  # a number, or "max" for -qps 0
        requested = float(doc.get("RequestedQPS") or 0)
    except ValueError:
        requested = 0.0
    ops_per_s = ok / window if window else 0.0
    return {"window_s": window, "ops": ok, "ops_per_s": ops_per_s, "gbit_per_s": 0.0, "errors": errors,
            "error_total": sum(errors.values()), "latency_ms": latency, "requested_rate": requested,
            "rate_kept": ops_per_s / requested if requested else None}


def parse_iperf3(doc: dict[str, Any]) -> dict[str, Any]:
    if "error" in doc:
        raise ValueError(f"iperf3: {doc['error']}")
    recv = doc["end"]["sum_received"]
    window = float(recv["seconds"])
    bits = float(recv["bits_per_second"])
    return {"window_s": window, "ops": 0, "ops_per_s": 0.0, "gbit_per_s": bits / 1e9, "bytes": int(recv["bytes"]),
            "errors": {}, "error_total": 0, "latency_ms": {}}


def command(tool: str, target: tuple[str, int], duration: float, rate: float | None) -> list[str]:
    host, port = target
    url = f"http://{host}:{port}/"
    secs = max(1, round(duration))
    if tool in ("wrk-rr", "wrk-crr"):
        path = tool_path("wrk")
        if path is None:
            raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
        close = ["-H", "Connection: close"] if tool == "wrk-crr" else []
        return [path, "-t2", f"-c{CONNS}", f"-d{secs}s", "--latency", *close, url]
    if tool in ("fortio-max", "fortio-crr"):
        path = tool_path("fortio")
        if path is None:
            raise FileNotFoundError("fortio is not built (bash bench/build-tools.sh)")
        if tool == "fortio-max":
            pace = ["-qps", "0"]
        elif not rate:
            raise ValueError("fortio-crr needs --rate")
        else:
            pace = ["-qps", f"{rate:.0f}", "-nocatchup", "-uniform"]
        return [path, "load", "-quiet", *pace, "-c", str(CONNS), "-t", f"{secs}s", "-keepalive=false",
                "-p", "50,90,99,99.9", "-json", "-", url]
    if tool == "iperf3":
        path = tool_path("iperf3")
        if path is None:
            raise FileNotFoundError("iperf3 is not installed (apt-get install iperf3)")
        return [path, "-c", host, "-p", str(port), "-t", str(secs), "-J"]
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")


def run(tool: str, target: tuple[str, int], duration: float, rate: float | None) -> dict[str, Any]:
    argv = command(tool, target, duration, rate)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    if tool.startswith("wrk"):
        summary = parse_wrk(done.stdout)
    elif tool.startswith("fortio"):
        summary = parse_fortio(json.loads(done.stdout))
    else:
        summary = parse_iperf3(json.loads(done.stdout))
    summary.update({"mode": MODES[tool], "tool": tool, "client_cpu_s": usage.ru_utime + usage.ru_stime})
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cload")
    p.add_argument("tool", choices=TOOLS)
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rate", type=float, help="fortio-crr: requests per second")
    p.add_argument("--json", action="store_true", help="print {'summary': ...} (always on; for bench.load's shape)")
    p.add_argument("--no-progress", action="store_true", help="accepted for bench.load's shape")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        summary = run(args.tool, (host, int(port)), args.duration, args.rate)
    except (OSError, ValueError, RuntimeError, KeyError, subprocess.TimeoutExpired) as exc:
        print(f"bench.cload: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
