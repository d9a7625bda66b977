"""Load results: what one load process measured, how processes merge, what gets reported.

Rules kept here:
- A `Result` is a plain frozen value (picklable, JSON-able): counts, the measurement window,
  errors by class, and latencies as an encoded HDR histogram (microseconds, 1 us .. 60 s,
  3 significant digits), so that merging processes is exact, not an average of percentiles.
- Merging: counts and errors add (`extra` keys ending in `_max` take the maximum),
  histograms add, the window is the longest of the processes (they start together on a
  shared monotonic deadline), client CPU seconds add.
- Errors are classed as refused, reset, timeout, eof (peer closed early), or the errno name.
- Rates are derived only here: ops/s = ops / window, Gbit/s = bytes * 8 / window / 1e9.
"""

from __future__ import annotations

import errno
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode("ascii")) if hist.get_total_count() else ""


def decode(text: str) -> HdrHistogram:
    hist = new_histogram()
    if text:
        hist.decode_and_add(text.encode("ascii"))
    return hist


def clamp_us(seconds: float) -> int:
    return min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US)


class Recorder:
    """Latencies in microseconds, buffered in an array and folded into an HDR histogram in bulk.

    `HdrHistogram.record_value` is pure Python (~14 us a call, a tenth of a crr exchange's
    client cost); folding a run's values grouped by value is far cheaper and happens outside
    the hot path. The buffer is bounded: it folds itself every FOLD_AT values.
    """

    FOLD_AT = 1_000_000

    def __init__(self) -> None:
        self._values = array("q")
        self._hist = new_histogram()

    def record(self, seconds: float) -> None:
        self._values.append(clamp_us(seconds))
        if len(self._values) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        for value, count in Counter(self._values).items():
            self._hist.record_value(value, count)
        self._values = array("q")

    def histogram(self) -> HdrHistogram:
        self._fold()
        return self._hist

    def encoded(self) -> str:
        return encode(self.histogram())


class EarlyEOF(ConnectionError):
    """The peer closed before the expected bytes arrived."""


def classify(exc: BaseException) -> str:
    """Error class name for an exception raised by a connection attempt or exchange."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, EarlyEOF):
        return "eof"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}").lower()
    return type(exc).__name__.lower()


@dataclass(frozen=True)
class Result:
    mode: str
    procs: int = 1
    window_s: float = 0.0  # measurement window (the longest process's)
    ops: int = 0  # completed operations: requests, connections, held connections
    bytes: int = 0  # payload bytes delivered (stream)
    conns_opened: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    latency: str = ""  # encoded HDR histogram, us: from scheduled (latency) or actual start
    lag: str = ""  # latency mode: how late ops started after their scheduled time, us
    client_cpu_s: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict)  # mode-specific; see add_counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "procs": self.procs, "window_s": self.window_s, "ops": self.ops,
            "bytes": self.bytes, "conns_opened": self.conns_opened, "errors": dict(self.errors),
            "latency": self.latency, "lag": self.lag, "client_cpu_s": self.client_cpu_s,
            "extra": dict(self.extra),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Result:
        return Result(
            mode=str(d["mode"]), procs=int(d["procs"]), window_s=float(d["window_s"]),
            ops=int(d["ops"]), bytes=int(d["bytes"]), conns_opened=int(d["conns_opened"]),
            errors={str(k): int(v) for k, v in d["errors"].items()}, latency=str(d["latency"]),
            lag=str(d["lag"]), client_cpu_s=float(d["client_cpu_s"]),
            extra={str(k): float(v) for k, v in d["extra"].items()},
        )


def add_counts(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Key-wise sum; keys ending in `_max` take the maximum instead."""
    out = dict(a)
    for k, v in b.items():
        if k.endswith("_max"):
            out[k] = max(out.get(k, v), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


def _merge_hist(texts: Iterable[str]) -> str:
    hist = new_histogram()
    for text in texts:
        if text:
            hist.decode_and_add(text.encode("ascii"))
    return encode(hist)


def merge(results: Iterable[Result]) -> Result:
    """One Result for several load processes of the same run."""
    rs = list(results)
    if not rs:
        raise ValueError("nothing to merge")
    if len({r.mode for r in rs}) != 1:
        raise ValueError("cannot merge results of different modes")
    errors: dict[str, float] = {}
    extra: dict[str, float] = {}
    for r in rs:
        errors = add_counts(errors, r.errors)
        extra = add_counts(extra, r.extra)
    return Result(
        mode=rs[0].mode, procs=sum(r.procs for r in rs), window_s=max(r.window_s for r in rs),
        ops=sum(r.ops for r in rs), bytes=sum(r.bytes for r in rs),
        conns_opened=sum(r.conns_opened for r in rs),
        errors={k: int(v) for k, v in sorted(errors.items())},
        latency=_merge_hist(r.latency for r in rs), lag=_merge_hist(r.lag for r in rs),
        client_cpu_s=sum(r.client_cpu_s for r in rs), extra=extra,
    )


def percentiles_ms(text: str) -> dict[str, float]:
    """p50/p90/p99/p99.9/max (and mean) in milliseconds; {} when nothing was recorded."""
    hist = decode(text)
    if hist.get_total_count() == 0:
        return {}
    out = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000.0
    out["mean"] = hist.get_mean_value() / 1000.0
    return out


def rate(count: float, window_s: float) -> float:
    return count / window_s if window_s > 0 else 0.0


def summarize(r: Result) -> dict[str, Any]:
    """The derived, human-meaningful figures of one (merged) result."""
    out: dict[str, Any] = {
        "mode": r.mode, "procs": r.procs, "window_s": round(r.window_s, 4), "ops": r.ops,
        "ops_per_s": rate(r.ops, r.window_s), "gbit_per_s": rate(r.bytes * 8, r.window_s) / 1e9,
        "bytes": r.bytes, "conns_opened": r.conns_opened, "errors": dict(r.errors),
        "error_total": sum(r.errors.values()), "client_cpu_s": r.client_cpu_s,
        "latency_ms": percentiles_ms(r.latency),
    }
    if r.lag:
        out["sched_lag_ms"] = percentiles_ms(r.lag)
    out.update({k: v for k, v in r.extra.items()})
    return out
