"""`python -m bench.scale` end to end, tiny (50 Services): the real API server, pyproxy and
kube-proxy in their lab nodes, every measurement once, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import privileged_reason, skip_or_fail
from tests.realapi.kube import build_binaries

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.privileged


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_scale_bench_tiny(tmp_path: Path) -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    try:
        build_binaries()
        subprocess.run(["bash", str(ROOT / "bench" / "build-kube-proxy.sh")], check=True, timeout=3 * 3600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        skip_or_fail(f"cannot build kube-apiserver/etcd/kube-proxy: {exc}")
    before = namespaces()
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--services", "50", "--rounds", "2",
                           "--duration", "3", "--settle", "0.5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result["contenders"]) == {"pyproxy", "kube-proxy"}
    for name, figures in result["contenders"].items():
        assert 0 < figures["first_served_s"] < 120, (name, figures)
        assert len(figures["routed_ms"]["all"]) == 2, (name, figures)
        assert 0 < figures["routed_ms"]["max"] < 30_000, (name, figures)  # the probe's bound
        assert figures["cpu_under_updates_pct"] > 0, (name, figures)
        assert 0 < figures["rss_end_mib"] <= figures["peak_rss_mib"], (name, figures)
        assert 0 < figures["pss_after_first_sync_mib"] <= figures["rss_after_first_sync_mib"], (name, figures)
    assert result["contenders"]["pyproxy"]["first_sync_s"] > 0
    assert 0 < result["contenders"]["pyproxy"]["first_sync_cpu_ms"] < 60_000
    assert "| endpoints to routed p50 (ms) |" in done.stdout
    assert not (namespaces() - before), "the bench left namespaces behind"


def test_first_sync_reads_the_log_line_with_and_without_its_cpu(tmp_path: Path) -> None:
    from bench.rigs.scale import first_sync

    log = tmp_path / "pyproxy.log"
    log.write_text("2026-12-08 01:27:12,811 INFO pyproxy: synced 3 services (full write: +3 -0 elements) "
                   "in 456.9 ms (101.5 ms of CPU)\n")
    found = first_sync(log, 0.0)
    assert found is not None and found[1:] == (456.9, 101.5)
    log.write_text("2026-12-08 01:27:12,811 INFO pyproxy: synced 3 services (full write: +3 -0 elements) in 456.9 ms\n")
    found = first_sync(log, 0.0)
    assert found is not None and found[1:] == (456.9, None)
