"""The workloads the runner measures, for a full run and for `--quick`.

Rules kept here:
- A `Workload` is the load tool's mode plus its arguments, a duration and the figure it is
  judged by; the runner adds only `--target` (and the source addresses where asked).
- `latency` workloads carry a fraction: their rate is that fraction of a reference crr rate
  measured earlier in the same run (HAProxy 1 thread's median, per shared/BENCH.md), so a
  `crr` workload must come before them.
- Quick: fewer rounds, shorter, a subset (stream-1, crr, latency@50%, idle), for a CI smoke
  run under 5 minutes with the five non-pyproxy families.
- `restart` and `crash` (bench/loadtool/restart.py): one run per contender that can be restarted
  (pyproxy: a successor started beside it takes over, twice; `crash`: kill -9 of its serving
  process(es), twice, its supervisor starting the next; dnat: nothing to restart, its state
  is the kernel's, as kube-proxy's).
- A workload with a `tool` runs a C/Go load generator (bench/loadtool/cload.py) against the service on
  `port` (contenders.HTTP_PORT or IPERF_PORT) instead of the Python load tool; `ref` names
  the crr workload whose HAProxy rate a latency fraction applies to.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.runner.contenders import BACKEND_PORT, HTTP_PORT, IPERF_PORT


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str
    duration: float
    args: tuple[str, ...] = ()
    use_sources: bool = False  # spread connections over the client's source addresses
    rate_fraction: float = 0.0  # latency: fraction of the reference crr rate
    contenders: tuple[str, ...] = ()  # restart, crash: only these ids ('' : every one that can restart)
    tool: str = ""  # bench.cload tool ("" = the Python load tool, bench.load)
    port: int = BACKEND_PORT  # the backend service the workload talks to
    ref: str = "crr"  # latency: the crr workload whose reference rate it takes

    @property
    def module(self) -> str:
        return "bench.cload" if self.tool else "bench.load"

    def load_args(self, target: tuple[str, int], sources: str, rate: float | None = None) -> list[str]:
        if self.tool:
            argv = [self.tool, "--target", f"{target[0]}:{target[1]}", "--duration", f"{self.duration:g}", "--json"]
            return argv + (["--rate", f"{rate:.0f}"] if rate is not None else [])
        argv = [self.mode, "--target", f"{target[0]}:{target[1]}", "--duration", f"{self.duration:g}",
                *self.args, "--json", "--no-progress"]
        if self.use_sources and sources:
            argv += ["--source-addrs", sources]
        if rate is not None:
            argv += ["--rate", f"{rate:.0f}"]
        return argv


def full(duration: float = 5.0, idle_conns: int = 10000) -> list[Workload]:
    d = duration
    return [
        Workload("stream-1", "stream", d, ("--conns", "1")),
        Workload("stream-4", "stream", d, ("--conns", "4")),
        Workload("rr", "rr", d, ("--conns", "16", "--procs", "2")),
        Workload("crr", "crr", d, ("--conns", "16", "--procs", "2"), use_sources=True),
        *(Workload(f"latency@{int(f * 100)}%", "latency", d, ("--procs", "2"), use_sources=True,
                   rate_fraction=f) for f in (0.25, 0.5, 0.75)),
        Workload("idle", "idle", max(d, 5.0), ("--conns", str(idle_conns), "--procs", "2"),
                 use_sources=True),
        Workload("affinity", "affinity", max(d, 10.0), ("--per-client", "8", "--conns", "16", "--settle", "3"),
                 use_sources=True),
        *c_tools(d),
        *control(30),
        Workload("restart", "restart", 60.0, ("--conns", "4", "--held", "50")),
        Workload("crash", "crash", 60.0, ("--conns", "4", "--held", "50")),
    ]


def c_tools(duration: float, fractions: tuple[float, ...] = (0.75,)) -> list[Workload]:
    """The C/Go load generators: iperf3 stream, wrk rr and crr, fortio at fixed crr rates: as
    fractions of HAProxy's crr rate under wrk (`-fortio`) and under fortio itself
    (`-fortio-max`, after `crr-fortio`)."""
    d = duration
    return [
        Workload("stream-iperf3", "stream", d, tool="iperf3", port=IPERF_PORT),
        Workload("rr-wrk", "rr", d, tool="wrk-rr", port=HTTP_PORT),
        Workload("crr-wrk", "crr", d, tool="wrk-crr", port=HTTP_PORT),
        Workload("crr-fortio", "crr", d, tool="fortio-max", port=HTTP_PORT),
        *(Workload(f"latency@{int(f * 100)}%-fortio", "latency", d, rate_fraction=f, tool="fortio-crr",
                   port=HTTP_PORT, ref="crr-wrk") for f in fractions),
        *(Workload(f"latency@{int(f * 100)}%-fortio-max", "latency", d, rate_fraction=f, tool="fortio-crr",
                   port=HTTP_PORT, ref="crr-fortio") for f in fractions),
    ]


def control(changes: int, sizes: tuple[int, ...] = (100, 1000, 10000)) -> list[Workload]:
    """pyproxy's control plane at N Services (`bench.controlplane`): measured once per run,
    `changes` changes each, not per contender (nothing else has this control plane)."""
    return [Workload(f"control@{n // 1000}k" if n >= 1000 else f"control@{n}", "control", 0.0,
                     ("--services", str(n), "--changes", str(changes))) for n in sizes]


def quick(duration: float = 1.5, idle_conns: int = 1000) -> list[Workload]:
    d = duration
    return [
        Workload("stream-1", "stream", d, ("--conns", "1")),
        Workload("crr-wrk", "crr", d, tool="wrk-crr", port=HTTP_PORT),  # the C client: the kit's wrk path too
        Workload("latency@50%", "latency", d, ("--procs", "2"), use_sources=True, rate_fraction=0.5, ref="crr-wrk"),
        Workload("idle", "idle", d, ("--conns", str(idle_conns), "--procs", "2"), use_sources=True),
        Workload("affinity", "affinity", 3.0, ("--per-client", "4", "--conns", "16", "--settle", "1"),
                 use_sources=True),
        *control(10, (10000,)),
        Workload("restart", "restart", 60.0, ("--conns", "2", "--held", "10"), contenders=("dnat", "pyproxy")),
    ]


def select(workloads: list[Workload], text: str) -> list[Workload]:
    """`--workloads`: names or modes, comma-separated; '' keeps all. A token that names a
    workload selects that one only (`crr`: not `crr-wrk`)."""
    tokens = {t.strip() for t in text.split(",") if t.strip()}
    if not tokens:
        return workloads
    names = {w.name for w in workloads}
    modes = {t for t in tokens if t not in names}  # "crr" is the workload first, not every crr-mode one
    chosen = [w for w in workloads if w.name in tokens or w.mode in modes]
    if not chosen:
        raise ValueError(f"no workload matches {sorted(tokens)}; have {[w.name for w in workloads]}")
    return chosen
