"""The C load generators' output parsers (bench/loadtool/cload.py), on real output shapes."""

from __future__ import annotations

import pytest

from bench.loadtool import cload

WRK = """Running 5s test @ http://10.96.0.12:80/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   712.31us  301.20us   9.80ms   80.00%
    Req/Sec    11.20k     1.10k   13.40k    70.00%
  Latency Distribution
     50%  650.00us
     75%  820.00us
     90%    1.10ms
     99%    2.05ms
  111500 requests in 5.00s, 17.10MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  22300.00
Transfer/sec:      3.42MB
"""


def test_wrk_report() -> None:
    s = cload.parse_wrk(WRK)
    assert s["ops"] == 111500 and s["window_s"] == 5.0 and s["ops_per_s"] == pytest.approx(22300)
    assert s["latency_ms"] == pytest.approx({"p50": 0.65, "p75": 0.82, "p90": 1.1, "p99": 2.05})
    assert s["errors"] == {"read": 3, "timeout": 1, "non_2xx": 2} and s["error_total"] == 6


def test_wrk_without_a_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="no request count"):
        cload.parse_wrk("unable to connect to 10.96.0.12:80 Connection refused\n")


def test_fortio_result() -> None:
    doc = {"RequestedQPS": "1000", "ActualDuration": 5_000_000_000, "RetCodes": {"200": 4900, "-1": 20},
           "DurationHistogram": {"Count": 4930, "Max": 0.0123,
                                 "Percentiles": [{"Percentile": 50, "Value": 0.0011},
                                                 {"Percentile": 99, "Value": 0.004},
                                                 {"Percentile": 99.9, "Value": 0.009}]}}
    s = cload.parse_fortio(doc)
    assert s["ops_per_s"] == pytest.approx(980) and s["rate_kept"] == pytest.approx(0.98)
    assert s["latency_ms"] == pytest.approx({"p50": 1.1, "p99": 4.0, "p99.9": 9.0, "max": 12.3})
    assert s["errors"] == {"code_-1": 20, "other": 10} and s["error_total"] == 30


def test_iperf3_result_and_its_error() -> None:
    s = cload.parse_iperf3({"end": {"sum_received": {"seconds": 5.0, "bits_per_second": 12.5e9, "bytes": 7_812_500_000}}})
    assert s["gbit_per_s"] == pytest.approx(12.5) and s["window_s"] == 5.0
    with pytest.raises(ValueError, match="unable to connect"):
        cload.parse_iperf3({"error": "unable to connect to server"})


@pytest.fixture(autouse=True)
def tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argv each tool gets is pure: these tests need no tool installed or built (a CI
    machine with a cold cache has no fortio until bench/build-tools.sh has run)."""
    monkeypatch.setattr(cload, "tool_path", lambda name: f"/opt/tools/{name}")


def test_a_missing_tool_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cload, "tool_path", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"fortio is not built \(bash bench/build-tools.sh\)"):
        cload.command("fortio-max", ("10.0.0.1", 80), 5, None)
    with pytest.raises(FileNotFoundError, match=r"wrk is not installed"):
        cload.command("wrk-crr", ("10.0.0.1", 80), 5, None)


def test_commands() -> None:
    assert "Connection: close" in cload.command("wrk-crr", ("10.0.0.1", 80), 5, None)
    assert "Connection: close" not in cload.command("wrk-rr", ("10.0.0.1", 80), 5, None)
    with pytest.raises(ValueError, match="--rate"):
        cload.command("fortio-crr", ("10.0.0.1", 80), 5, None)
    with pytest.raises(ValueError, match="unknown tool"):
        cload.command("ab", ("10.0.0.1", 80), 5, None)


def test_fortio_max_runs_unpaced_and_reads_its_result() -> None:
    argv = cload.command("fortio-max", ("10.0.0.1", 80), 5, None)
    assert argv[argv.index("-qps") + 1] == "0" and "-nocatchup" not in argv and "-keepalive=false" in argv
    paced = cload.command("fortio-crr", ("10.0.0.1", 80), 5, 1200.0)
    assert paced[paced.index("-qps") + 1] == "1200" and "-nocatchup" in paced
    doc = {"RequestedQPS": "max", "ActualDuration": 2_000_000_000, "RetCodes": {"200": 9000},
           "DurationHistogram": {"Count": 9000, "Max": 0.01, "Percentiles": [{"Percentile": 99, "Value": 0.003}]}}
    s = cload.parse_fortio(doc)
    assert s["ops_per_s"] == pytest.approx(4500) and s["rate_kept"] is None and s["error_total"] == 0
