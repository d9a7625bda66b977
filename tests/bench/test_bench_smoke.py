"""The load tool against the backend on loopback in a private namespace, ~1 s per mode;
and the runner end to end with the `direct` contender only (both privileged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import private_netns

ROOT = Path(__file__).resolve().parents[2]
PORT = 9000

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    backend: subprocess.Popen[bytes] | None = None
    with private_netns(f"pbt{os.getpid()}-smoke") as name:
        try:
            backend = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-m", "bench.backend", "--port", str(PORT),
                 "--name", "be-smoke"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            probe = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "bench.probe",
                                    "--target", f"127.0.0.1:{PORT}", "--timeout", "10"], cwd=ROOT, timeout=30)
            assert probe.returncode == 0, "backend did not come up"
            yield name
        finally:
            if backend is not None:
                os.killpg(backend.pid, 15)
                backend.wait(timeout=10)


def load(ns: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.load", *args,
                           "--target", f"127.0.0.1:{PORT}", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.parametrize("direction", ["up", "down"])
def test_stream(netns: str, direction: str) -> None:
    s = load(netns, "stream", "--duration", "1", "--conns", "2", "--direction", direction)["summary"]
    assert s["errors"] == {} and s["bytes"] > 1_000_000 and s["gbit_per_s"] > 0.01
    assert 0.8 < s["window_s"] < 3.0


def test_rr(netns: str) -> None:
    s = load(netns, "rr", "--duration", "1", "--conns", "4", "--procs", "2")["summary"]
    assert s["errors"] == {} and s["ops"] > 100 and s["procs"] == 2 and s["conns_opened"] == 4
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]


def test_crr_from_several_sources_with_count_bound(netns: str) -> None:
    s = load(netns, "crr", "--duration", "5", "--conns", "4", "--source-addrs", "127.0.1.0/29",
             "--max-ops", "300")["summary"]
    assert s["errors"] == {} and s["ops"] == 300 and s["conns_opened"] == 300
    assert s["window_s"] < 5.0  # the count bound ended it


def test_latency_open_loop(netns: str) -> None:
    for op in ("crr", "rr"):
        s = load(netns, "latency", "--duration", "1", "--rate", "300", "--op", op, "--procs", "2")["summary"]
        assert s["errors"] == {} and s["ops"] == 300
        assert set(s["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
        assert s["sched_lag_ms"]["p50"] >= 0


def test_idle(netns: str) -> None:
    s = load(netns, "idle", "--duration", "1", "--conns", "300", "--procs", "2")["summary"]
    assert s["established"] == 300 and s["target"] == 300 and s["errors"] == {}


def test_affinity_with_removal_hook(netns: str) -> None:
    doc = load(netns, "affinity", "--duration", "5", "--source-addrs", "127.0.2.1,127.0.2.2,127.0.2.3",
               "--per-client", "3", "--remove-hook", "true", "--removed-name", "be-gone", "--settle", "0")
    rep = doc["affinity"]
    assert rep["clients"] == 3 and rep["sticky_share"] == 1.0
    assert rep["clients_per_backend"] == {"be-smoke": 3}
    assert rep["removed"] == "be-gone" and rep["moved_needlessly"] == 0 and rep["eligible"] == 3


def test_refused_is_counted_not_fatal(netns: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "bench.load", "crr",
                           "--target", "127.0.0.1:9", "--duration", "0.5", "--conns", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    s = json.loads(done.stdout)["summary"]
    assert s["ops"] == 0 and s["errors"].get("refused", 0) > 0


def test_runner_end_to_end_cleans_up(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.run", "--contenders", "direct", "--workloads", "crr,idle",
                           "--rounds", "1", "--duration", "0.5", "--idle-conns", "50", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 120
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [m["contender"] for m in doc["measurements"]] == ["direct", "direct"]
    assert all(not m["error"] for m in doc["measurements"])
    assert (tmp_path / "results.md").read_text().count("| direct |") >= 1
    assert (tmp_path / "results.png").stat().st_size > 1000
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert doc["meta"]["prefix"] not in left and doc["meta"]["teardown_errors"] == []


def test_topology_never_deletes_a_namespace_it_did_not_make() -> None:
    from bench.runner import topology

    t = topology.Topology(f"pbt{os.getpid()}x-", backends=1, sources=1)
    subprocess.run(["ip", "netns", "add", t.client_ns], check=True, timeout=30)
    made: list[str] = []
    try:
        with pytest.raises(RuntimeError, match="already exist"):
            topology.create(t, made)
        assert made == [] and topology.destroy(made) == []
        assert t.client_ns in topology.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", t.client_ns], timeout=30)


def test_runner_with_pyproxy_fast_path_and_workers(tmp_path: Path) -> None:
    """The default (splice) relay, alone and as 2 reuseport workers, through the real TPROXY rules:
    connections flow, and every client stays on one backend across connections and workers,
    and is not moved when another backend is removed."""
    done = subprocess.run([sys.executable, "-m", "bench.run", "--contenders", "pyproxy,pyproxy-2w",
                           "--workloads", "crr-wrk,affinity", "--rounds", "1", "--duration", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["skipped"] == {}, doc["skipped"]
    by = {(m["workload"], m["contender"]): m for m in doc["measurements"]}
    for variant in ("pyproxy", "pyproxy-2w"):
        crr, aff = by[("crr-wrk", variant)], by[("affinity", variant)]  # crr with wrk, through TPROXY
        assert not crr["error"] and crr["summary"]["ops"] > 100 and crr["summary"]["error_total"] == 0
        assert not aff["error"] and aff["summary"]["sticky_share"] == 1.0
        assert aff["summary"]["moved_needlessly_share"] == 0.0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert doc["meta"]["prefix"] not in left
