"""tests/kind/e2e.py's reading of ginkgo's junit report: what ran, passed, failed, skipped itself."""

from __future__ import annotations

from pathlib import Path

from tests.kind.e2e import read_junit

REPORT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="5" failures="1" time="324.5">
  <testsuite name="Kubernetes e2e suite" tests="5" time="324.5">
    <testcase name="[SynchronizedBeforeSuite]" status="passed" time="3"></testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods" status="passed" time="9"/>
    <testcase name="[It] [sig-network] Services should be rejected when no endpoints exist" status="failed" time="30">
      <failure message="connection to 10.96.4.4:80 was not refused" type="failed">at service.go:123</failure>
    </testcase>
    <testcase name="[It] [sig-network] Services should work after restarting kube-proxy" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [sig-network] Services should handle load balancer cleanup" status="skipped" time="1">
      <skipped message="skipped - Only supported for providers [gce gke] (not skeleton)"></skipped>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_junit_report(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(REPORT)
    result = read_junit(path)
    assert result.passed == ["[It] [sig-network] Services should serve a basic endpoint from pods"]
    assert list(result.failed) == ["[It] [sig-network] Services should be rejected when no endpoints exist"]
    assert "was not refused" in result.failed["[It] [sig-network] Services should be rejected when no endpoints exist"]
    # left out by the focus: not part of the run; skipped by the spec itself: with its reason
    assert result.skipped == {"[It] [sig-network] Services should handle load balancer cleanup":
                              "Only supported for providers [gce gke] (not skeleton)"}
    assert result.seconds == 324.5
    assert result.summary() == "e2e: 1 passed, 1 failed, 1 skipped in 324 s"
