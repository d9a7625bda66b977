"""Cross-round statistics, per-core ratios and affinity analysis (all pure)."""

from __future__ import annotations

import pytest

from bench.loadtool.affinity import analyze, infer_removed, merge_observations
from bench.reporting.summary import Measurement, aggregate, figures, per_core, ratio, reference_rate, spread


def m(contender: str, rnd: int, ops: float = 0.0, gbit: float = 0.0, cpu: float | None = None,
      workload: str = "crr", mode: str = "crr", error: str = "", **extra: object) -> Measurement:
    summary = {"window_s": 2.0, "ops_per_s": ops, "gbit_per_s": gbit, "error_total": 0,
               "latency_ms": {"p99": 1.0 + rnd}, **extra}
    return Measurement(workload, mode, contender, rnd, error=error, summary=summary, proxy_cpu_s=cpu)


def test_per_core() -> None:
    assert per_core(10.0, 1.0, 2.0) == pytest.approx(20.0)  # half a core busy: 20 per core
    assert per_core(10.0, None, 2.0) is None  # kernel contenders: no proxy process
    assert per_core(10.0, 0.0, 2.0) is None
    assert per_core(10.0, 1.0, 0.0) is None


def test_figures_stream_and_crr() -> None:
    f = figures(m("haproxy-1t", 1, gbit=12.0, cpu=2.0, workload="stream-1", mode="stream"))
    assert f["gbit_per_core"] == pytest.approx(12.0)
    assert f["proxy_cores"] == pytest.approx(1.0)
    f = figures(m("direct", 1, ops=10_000))
    assert f["ops_per_core"] is None and f["p99_ms"] == 2.0


def test_figures_idle_memory_per_connection() -> None:
    meas = Measurement("idle", "idle", "nginx-1w", 1, summary={"window_s": 5.0, "established": 1000, "target": 1000},
                       pss_before=10 * 1024 * 1024, pss_peak=20 * 1024 * 1024, proxy_cpu_s=0.1)
    f = figures(meas)
    assert f["mem_per_conn_kib"] == pytest.approx(10 * 1024 / 1000)
    assert f["established"] == 1000


def test_spread() -> None:
    st = spread([3.0, 1.0, None, 2.0, 10.0, 4.0])
    assert st is not None
    assert (st.median, st.low, st.high, st.n) == (3.0, 1.0, 10.0, 5)
    assert st.rel_spread == pytest.approx(3.0)
    assert spread([None]) is None


def test_aggregate_counts_failures_and_skips_them() -> None:
    ms = [m("haproxy-1t", r, ops=1000.0 * r, cpu=1.0) for r in (1, 2, 3)]
    ms.append(m("haproxy-1t", 4, error="load run exceeded its time bound"))
    ms += [m("direct", r, ops=4000.0) for r in (1, 2, 3, 4)]
    cells = aggregate(ms)
    assert [c.contender for c in cells] == ["haproxy-1t", "direct"]
    hap = cells[0]
    assert (hap.rounds, hap.failures) == (4, 1)
    assert hap.errors == ("load run exceeded its time bound",)
    assert hap.median("ops_per_s") == 2000.0
    assert hap.stats["ops_per_core"].median == pytest.approx(4000.0)
    assert ratio(cells, "crr", "haproxy-1t", "direct", "ops_per_s") == pytest.approx(0.5)
    assert ratio(cells, "crr", "haproxy-1t", "nobody", "ops_per_s") is None


def test_reference_rate_prefers_haproxy_then_best() -> None:
    cells = aggregate([m("haproxy-1t", 1, ops=3000.0), m("direct", 1, ops=9000.0)])
    assert reference_rate(cells) == 3000.0
    assert reference_rate(aggregate([m("direct", 1, ops=9000.0), m("socat", 1, ops=100.0)])) == 9000.0
    assert reference_rate([]) is None


def test_affinity_sticky_share_and_needless_moves() -> None:
    before = {"a": ["be1", "be1"], "b": ["be2", "be2"], "c": ["be1", "be2"], "d": ["be3", "be3"], "e": []}
    after = {"a": ["be1", "be1"], "b": ["be1", "be2"], "c": ["be1"], "d": ["be1", "be1"], "e": ["be1"]}
    rep = analyze(before, after)
    assert rep["clients"] == 5 and rep["clients_answered"] == 4
    assert rep["sticky"] == 3 and rep["sticky_share"] == pytest.approx(0.75)
    assert rep["removed"] == "be3"  # inferred: seen before, gone after
    assert rep["displaced"] == 1  # d was on the removed backend: moving was needed
    assert rep["eligible"] == 2  # a and b
    assert rep["moved_needlessly"] == 1 and rep["moved_needlessly_share"] == pytest.approx(0.5)


def test_affinity_without_second_phase_and_ambiguous_removal() -> None:
    rep = analyze({"a": ["x"]})
    assert "removed" not in rep and rep["sticky_share"] == 1.0
    assert infer_removed({"a": ["x"], "b": ["y"]}, {"a": ["z"]}) is None
    assert merge_observations([{"a": ["x"]}, {"a": ["y"], "b": ["z"]}]) == {"a": ["x", "y"], "b": ["z"]}


def test_figures_machine_cores_and_rate_kept() -> None:
    meas = m("pyproxy", 1, ops=900.0, workload="latency@75%", mode="latency")
    meas = Measurement(meas.workload, meas.mode, meas.contender, 1, summary=meas.summary, proxy_cpu_s=1.0,
                       wall_s=2.5, rate=1000.0, machine_cpu_s=4.5)
    f = figures(meas)
    assert f["machine_cores"] == pytest.approx(1.8) and f["rate_kept"] == pytest.approx(0.9)
    assert figures(m("direct", 1, ops=10.0))["machine_cores"] is None  # not sampled
