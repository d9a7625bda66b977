"""From measurements to figures: per-measurement derivations and cross-round statistics.

Rules kept here:
- One `Measurement` = one contender under one workload in one round: the load tool's summary
  plus what the runner saw (proxy CPU seconds, backend CPU seconds, proxy memory).
- Per proxy core = figure / (proxy CPU seconds / measurement window). Kernel contenders
  (direct, dnat) have no proxy process: their per-core figures are None, never 0.
- Memory per connection (idle) = (peak Pss during the hold - Pss before) / established.
- Across rounds a figure is reported as median, min, max and n over the rounds that
  succeeded; a failed measurement is counted, not averaged in.
- Headline figure per mode: stream Gbit/s, rr/crr ops/s, latency p99 ms, idle established.
- Everything here is pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HEADLINE = {"stream": "gbit_per_s", "rr": "ops_per_s", "crr": "ops_per_s", "latency": "p99_ms",
            "idle": "established", "affinity": "sticky_share", "control": "p99_ms",
            "restart": "gap_ms", "crash": "gap_ms"}
LOWER_IS_BETTER = {"p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms", "mem_per_conn_kib", "errors"}


@dataclass(frozen=True)
class Measurement:
    workload: str
    mode: str
    contender: str
    round: int
    error: str = ""
    summary: Mapping[str, Any] = field(default_factory=dict)
    proxy_cpu_s: float | None = None
    backend_cpu_s: float = 0.0
    wall_s: float = 0.0
    pss_before: int | None = None
    pss_peak: int | None = None
    rate: float | None = None  # latency: the offered rate
    proxy_cpu_by_process: Mapping[str, float] = field(default_factory=dict)  # "pid comm" -> s, busiest
    machine_cpu_s: float | None = None  # the whole machine's busy CPU seconds over wall_s (procs.machine_busy_seconds)

    @property
    def ok(self) -> bool:
        return not self.error


def per_core(value: float, cpu_s: float | None, window_s: float) -> float | None:
    """value per proxy core; None when there is no proxy process or no measurable CPU."""
    if cpu_s is None or cpu_s <= 0 or window_s <= 0:
        return None
    return value / (cpu_s / window_s)


def figures(m: Measurement) -> dict[str, float | None]:
    s = m.summary
    window = float(s.get("window_s", 0.0))
    lat = s.get("latency_ms", {})
    out: dict[str, float | None] = {
        "gbit_per_s": float(s.get("gbit_per_s", 0.0)),
        "ops_per_s": float(s.get("ops_per_s", 0.0)),
        "errors": float(s.get("error_total", 0)),
        "proxy_cores": (m.proxy_cpu_s / window) if m.proxy_cpu_s is not None and window > 0 else None,
        "proxy_cpu_s": m.proxy_cpu_s,
        "client_cpu_s": float(s.get("client_cpu_s", 0.0)),
        "backend_cpu_s": m.backend_cpu_s,
        # how many of the machine's cores were busy (load, proxy, backends, softirq), over the
        # load's whole run: near the core count, the machine and not the proxy was the limit
        "machine_cores": (m.machine_cpu_s / m.wall_s) if m.machine_cpu_s is not None and m.wall_s > 0 else None,
    }
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        out[f"{key}_ms"] = lat.get(key)
    if m.mode == "stream":
        out["gbit_per_core"] = per_core(out["gbit_per_s"] or 0.0, m.proxy_cpu_s, window)
    if m.mode in ("rr", "crr", "latency"):
        out["ops_per_core"] = per_core(out["ops_per_s"] or 0.0, m.proxy_cpu_s, window)
    if m.mode == "idle":
        established = float(s.get("established", 0))
        out["established"] = established
        out["target"] = float(s.get("target", 0))
        if m.pss_before is not None and m.pss_peak is not None and established > 0:
            out["mem_per_conn_kib"] = max(0, m.pss_peak - m.pss_before) / established / 1024
    if m.mode == "affinity":
        for key in ("sticky_share", "after_sticky_share", "moved_needlessly_share"):
            value = s.get(key)
            out[key] = float(value) if value is not None else None
    if m.mode in ("restart", "crash"):
        restarts = max(1.0, float(s.get("restarts", 1)))
        out["gap_ms"] = float(s.get("gap_ms", 0.0))
        out["failed_per_restart"] = float(s.get("failed", 0)) / restarts
        out["held_lost_share"] = float(s.get("held_lost", 0)) / max(1.0, float(s.get("held", 0)))
        out["errors"] = float(s.get("failed", 0))
    if m.mode == "control":
        out["services"] = float(s.get("services", 0))
        out["full_sync_ms"] = float(s.get("full_sync_s", 0.0)) * 1000
    if m.rate is not None:
        out["offered_rate"] = m.rate
        out["rate_kept"] = (out["ops_per_s"] or 0.0) / m.rate if m.rate > 0 else None
    return out


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @property
    def rel_spread(self) -> float | None:
        """(max - min) / median: how much the rounds disagreed."""
        return (self.high - self.low) / self.median if self.median else None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n,
                "rel_spread": self.rel_spread}


def spread(values: Iterable[float | None]) -> Spread | None:
    vs = [v for v in values if v is not None]
    if not vs:
        return None
    return Spread(statistics.median(vs), min(vs), max(vs), len(vs))


@dataclass(frozen=True)
class Cell:
    """One contender under one workload, over all rounds."""

    workload: str
    mode: str
    contender: str
    rounds: int
    failures: int
    errors: tuple[str, ...]
    stats: Mapping[str, Spread]

    def median(self, key: str) -> float | None:
        st = self.stats.get(key)
        return st.median if st else None


def aggregate(measurements: Sequence[Measurement]) -> list[Cell]:
    """Cells in first-seen order of (workload, contender)."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.workload, m.contender), []).append(m)
    cells = []
    for (workload, contender), ms in groups.items():
        ok = [m for m in ms if m.ok]
        per = [figures(m) for m in ok]
        keys = sorted({k for f in per for k in f})
        stats = {k: st for k in keys if (st := spread(f.get(k) for f in per)) is not None}
        cells.append(Cell(workload, ms[0].mode, contender, len(ms), len(ms) - len(ok),
                          tuple(sorted({m.error for m in ms if m.error})), stats))
    return cells


def ratio(cells: Sequence[Cell], workload: str, contender: str, reference: str, key: str) -> float | None:
    """median(contender) / median(reference) for one figure of one workload."""
    mine = next((c for c in cells if c.workload == workload and c.contender == contender), None)
    ref = next((c for c in cells if c.workload == workload and c.contender == reference), None)
    a = mine.median(key) if mine else None
    b = ref.median(key) if ref else None
    return a / b if a is not None and b else None


def reference_rate(cells: Sequence[Cell], preferred: str = "haproxy-1t", workload: str = "crr") -> float | None:
    """The crr rate latency workloads take their fractions of: HAProxy 1 thread's median,
    else the best median among the contenders measured."""
    crr = [c for c in cells if c.workload == workload and c.median("ops_per_s")]
    pref = next((c for c in crr if c.contender == preferred), None)
    if pref is not None:
        return pref.median("ops_per_s")
    rates = [c.median("ops_per_s") or 0.0 for c in crr]
    return max(rates) if rates else None
