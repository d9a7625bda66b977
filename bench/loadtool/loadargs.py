"""Command line of `python -m bench.load`, turned into one frozen `LoadSpec`.

Rules kept here:
- Every run is bounded twice: by time (`--duration`, plus `--timeout` per operation and a hard
  deadline) and by count (`--max-ops`, and `--max-inflight` for the open loop).
- Sizes, counts and rates are validated here, once, with the flag's name in the message;
  the modes trust the spec.
- `--target` is HOST:PORT (IPv4). `--source-addrs` is a list and/or CIDRs (`bench.loadtool.addrs`).
- Parsing is pure: argv in, spec out (or `SpecError`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench.loadtool.addrs import parse_source_addrs

MODES = ("stream", "rr", "crr", "latency", "idle", "affinity")
KiB = 1024


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class LoadSpec:
    mode: str
    host: str
    port: int
    duration: float = 5.0
    conns: int = 1
    procs: int = 1
    sources: tuple[str, ...] = ()
    req_size: int = 64
    resp_size: int = 64
    chunk: int = 256 * KiB
    direction: str = "up"  # stream: up = client sends (backend counts), down = backend sends
    rate: float = 1000.0  # latency: operations per second, all processes together
    op: str = "crr"  # latency: what one operation is (crr or rr)
    max_inflight: int = 10000
    timeout: float = 5.0
    max_ops: int = 0  # 0 = no count bound beyond the time bound
    per_client: int = 8  # affinity: connections per source address
    remove_hook: str = ""  # affinity: command that removes one backend
    removed_name: str = ""  # affinity: which backend the hook removes (else inferred)
    settle: float = 1.0  # affinity: wait after the hook before the second phase
    json: bool = False
    progress: bool | None = None  # None: automatic (runs of 10 s and more)

    @property
    def target(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def hard_deadline_s(self) -> float:
        """No load process may run longer than this after the start (idle: ramp, then hold)."""
        return (2 if self.mode == "idle" else 1) * self.duration + 2 * self.timeout + 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description="bench load generator")
    a = p.add_argument
    a("mode", choices=MODES)
    a("--target", required=True, help="HOST:PORT of the backend, proxy or service")
    a("--duration", type=float, default=5.0, help="seconds of load (idle: seconds of holding)")
    a("--conns", type=int, default=None, help="connections (all processes together)")
    a("--procs", type=int, default=1, help="load-generating processes")
    a("--source-addrs", default="", help="source addresses: list and/or CIDRs, bound before connect")
    a("--req-size", type=int, default=64)
    a("--resp-size", type=int, default=64)
    a("--chunk", type=int, default=256 * KiB, help="stream: bytes per send/recv")
    a("--direction", choices=("up", "down"), default="up", help="stream direction")
    a("--rate", type=float, default=1000.0, help="latency: operations/s (all processes)")
    a("--op", choices=("crr", "rr"), default="crr", help="latency: kind of operation")
    a("--max-inflight", type=int, default=10000, help="latency: bound on operations in flight")
    a("--timeout", type=float, default=5.0, help="seconds allowed per connect/exchange")
    a("--max-ops", type=int, default=0, help="stop after this many operations (0: time only)")
    a("--per-client", type=int, default=8, help="affinity: connections per source address")
    a("--remove-hook", default="", help="affinity: command removing one backend, then phase 2")
    a("--removed-name", default="", help="affinity: name of the removed backend")
    a("--settle", type=float, default=1.0, help="affinity: seconds to wait after the hook")
    a("--json", action="store_true", help="print one JSON document instead of a table")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


DEFAULT_CONNS = {"stream": 1, "rr": 8, "crr": 16, "latency": 64, "idle": 1000, "affinity": 16}


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"--target: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SpecError(message)


def spec_from_args(ns: argparse.Namespace) -> LoadSpec:
    host, port = parse_target(ns.target)
    try:
        sources = parse_source_addrs(ns.source_addrs)
    except ValueError as exc:
        raise SpecError(f"--source-addrs: {exc}") from None
    conns = ns.conns if ns.conns is not None else DEFAULT_CONNS[ns.mode]
    _check(0 < ns.duration <= 86400, "--duration: must be in (0, 86400]")
    _check(0 < conns <= 1_000_000, "--conns: must be in [1, 1000000]")
    _check(0 < ns.procs <= 64, "--procs: must be in [1, 64]")
    _check(conns >= ns.procs or ns.mode in ("latency", "affinity"), "--conns: fewer than --procs")
    for flag, v in (("--req-size", ns.req_size), ("--resp-size", ns.resp_size), ("--chunk", ns.chunk)):
        _check(0 < v <= 16 * 1024 * 1024, f"{flag}: must be in [1, 16 MiB]")
    _check(0 < ns.rate <= 1_000_000, "--rate: must be in (0, 1000000]")
    _check(0 < ns.max_inflight <= 1_000_000, "--max-inflight: must be in [1, 1000000]")
    _check(0 < ns.timeout <= 600, "--timeout: must be in (0, 600]")
    _check(ns.max_ops >= 0, "--max-ops: must be >= 0")
    _check(0 < ns.per_client <= 10000, "--per-client: must be in [1, 10000]")
    _check(0 <= ns.settle <= 600, "--settle: must be in [0, 600]")
    return LoadSpec(
        mode=ns.mode, host=host, port=port, duration=ns.duration, conns=conns, procs=ns.procs,
        sources=sources, req_size=ns.req_size, resp_size=ns.resp_size, chunk=ns.chunk,
        direction=ns.direction, rate=ns.rate, op=ns.op, max_inflight=ns.max_inflight,
        timeout=ns.timeout, max_ops=ns.max_ops, per_client=ns.per_client,
        remove_hook=ns.remove_hook, removed_name=ns.removed_name, settle=ns.settle,
        json=ns.json, progress=ns.progress,
    )


def parse(argv: list[str] | None) -> LoadSpec:
    """argv -> spec; argparse exits on unknown flags, `SpecError` on bad values."""
    return spec_from_args(build_parser().parse_args(argv))
