"""Result merging, percentile math and error classes of the load tool."""

from __future__ import annotations

import errno

import pytest

from bench.loadtool import results as res
from bench.loadtool.results import Recorder, Result, merge, percentiles_ms, summarize


def hist_of(*seconds: float) -> str:
    rec = Recorder()
    for s in seconds:
        rec.record(s)
    return rec.encoded()


def test_merge_adds_counts_and_takes_longest_window() -> None:
    a = Result("crr", window_s=2.0, ops=100, conns_opened=100, errors={"reset": 1}, client_cpu_s=1.0)
    b = Result("crr", window_s=2.5, ops=50, conns_opened=60, errors={"reset": 2, "timeout": 3}, client_cpu_s=0.5)
    m = merge([a, b])
    assert (m.procs, m.ops, m.conns_opened, m.window_s) == (2, 150, 160, 2.5)
    assert m.errors == {"reset": 3, "timeout": 3}
    assert m.client_cpu_s == pytest.approx(1.5)


def test_merge_extra_sums_but_max_keys_take_maximum() -> None:
    a = Result("idle", extra={"established": 10, "ramp_s_max": 0.5})
    b = Result("idle", extra={"established": 5, "ramp_s_max": 0.2})
    assert merge([a, b]).extra == {"established": 15, "ramp_s_max": 0.5}


def test_merge_histograms_is_exact_not_an_average_of_percentiles() -> None:
    fast = Result("rr", latency=hist_of(*[0.001] * 99))
    slow = Result("rr", latency=hist_of(0.100))
    p = percentiles_ms(merge([fast, slow]).latency)
    assert p["p50"] == pytest.approx(1.0, rel=0.01)
    assert p["max"] == pytest.approx(100.0, rel=0.01)
    assert p["p99.9"] == pytest.approx(100.0, rel=0.01)


def test_merge_refuses_mixed_modes_and_nothing() -> None:
    with pytest.raises(ValueError):
        merge([Result("rr"), Result("crr")])
    with pytest.raises(ValueError):
        merge([])


def test_percentiles_of_a_uniform_spread() -> None:
    p = percentiles_ms(hist_of(*[i / 1e4 for i in range(1, 1001)]))  # 0.1 .. 100 ms
    assert p["p50"] == pytest.approx(50.0, rel=0.01)
    assert p["p90"] == pytest.approx(90.0, rel=0.01)
    assert p["p99"] == pytest.approx(99.0, rel=0.01)
    assert p["max"] == pytest.approx(100.0, rel=0.01)
    assert percentiles_ms("") == {}


def test_recorder_clamps_and_folds_in_bulk() -> None:
    rec = Recorder()
    rec.FOLD_AT = 3
    for s in (0.0, 1e-7, 0.002, 999.0):
        rec.record(s)
    hist = rec.histogram()
    assert hist.get_total_count() == 4
    assert hist.get_min_value() == res.LOWEST_US
    assert hist.get_max_value() >= res.HIGHEST_US * 0.999


def test_result_round_trips_through_dict() -> None:
    r = Result("latency", procs=2, window_s=1.5, ops=7, bytes=9, errors={"eof": 1},
               latency=hist_of(0.001), lag=hist_of(0.0002), extra={"x": 1.0})
    assert Result.from_dict(r.to_dict()) == r


def test_summarize_derives_rates() -> None:
    s = summarize(Result("stream", window_s=2.0, ops=1, bytes=2_500_000_000))
    assert s["gbit_per_s"] == pytest.approx(10.0)
    assert s["ops_per_s"] == pytest.approx(0.5)
    assert summarize(Result("rr"))["ops_per_s"] == 0.0  # empty window: no division by zero


@pytest.mark.parametrize(("exc", "kind"), [
    (ConnectionRefusedError(), "refused"),
    (ConnectionResetError(), "reset"),
    (BrokenPipeError(), "reset"),
    (TimeoutError(), "timeout"),
    (res.EarlyEOF("short"), "eof"),
    (OSError(errno.EADDRNOTAVAIL, "x"), "eaddrnotavail"),
    (ValueError("x"), "valueerror"),
])
def test_error_classes(exc: BaseException, kind: str) -> None:
    assert res.classify(exc) == kind
