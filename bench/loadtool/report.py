"""Human-readable output of the load tool: one summary as an aligned two-column table.

Rules kept here: pure string building from `results.summarize` (and `affinity.analyze`)
dictionaries; numbers get units and at most 3 significant decimals; nothing is printed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _line(key: str, value: str) -> str:
    return f"{key:<22} {value}"


def latency_cells(lat: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {lat[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max") if k in lat)


def format_summary(s: Mapping[str, Any], affinity: Mapping[str, Any] | None = None) -> str:
    rows = [
        _line("mode", f"{s['mode']}  ({s['procs']} process{'es' if s['procs'] != 1 else ''})"),
        _line("window", f"{s['window_s']:.3f} s"),
        _line("operations", f"{_num(s['ops'])}  ({_num(s['ops_per_s'])}/s)"),
        _line("connections opened", _num(s["conns_opened"])),
    ]
    if s["bytes"]:
        rows.append(_line("throughput", f"{s['gbit_per_s']:.3f} Gbit/s  ({_num(s['bytes'])} bytes)"))
    if s["latency_ms"]:
        rows.append(_line("latency ms", latency_cells(s["latency_ms"])))
    if s.get("sched_lag_ms"):
        rows.append(_line("start lag ms", latency_cells(s["sched_lag_ms"])))
    for key in ("target", "opened", "established", "ramp_s_max"):
        if key in s:
            rows.append(_line(key.replace("_max", ""), _num(s[key])))
    errors = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "none"
    rows.append(_line("errors", errors))
    rows.append(_line("client CPU", f"{s['client_cpu_s']:.2f} s"))
    for key, value in (affinity or {}).items():
        rows.append(_line(key.replace("_", " "), _num(value)))
    return "\n".join(rows)
