"""The conformance tier: Kubernetes' own e2e specs against pyproxy in the kind cluster.

Kubernetes proves kube-proxy with these specs (kind's e2e job runs them); here they run
against the same cluster as the rest of the kind tier, once per pod network: the focused
set (tests/kind/e2e.py `SELECTIONS["focused"]`) on both, and the Service specs of dual-stack
on the routed cluster. Every selected spec must run and pass: a spec the suite skipped, or
one missing from the report, fails the test as surely as a failed one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kind import e2e
from tests.kind.cluster import DUAL_STACK, Cluster
from tests.kind.dockerd import Daemon

pytestmark = pytest.mark.timeout(1800)


def _run(kind: Cluster, daemon: Daemon, name: str, out: Path) -> None:
    selection = e2e.SELECTIONS[name]
    wanted = e2e.list_specs(selection)
    assert wanted, f"the {name} selection picks no spec from e2e.test"
    e2e.prepare(kind, daemon)
    result = e2e.run(kind, daemon, selection, out)
    print(f"\n[e2e {name} {kind.cni}] {result.summary()}")
    assert not result.failed, "\n".join(f"{spec}:\n  {why}" for spec, why in result.failed.items())
    assert not result.skipped, result.skipped
    assert len(result.passed) == len(wanted), (sorted(result.passed), wanted)


def test_focused_e2e_specs_pass(kind: Cluster, kind_daemon: Daemon, tmp_path: Path) -> None:
    _run(kind, kind_daemon, "focused", tmp_path)


def test_dual_stack_service_e2e_specs_pass_on_the_dual_stack_cluster(kind: Cluster, kind_daemon: Daemon,
                                                                      tmp_path: Path) -> None:
    if kind.cni not in DUAL_STACK:
        # the bridge cluster is single-stack: there is no IPv6 Service to test; say so by checking it
        families = kind.kubectl("get", "service", "kubernetes", "-o", "jsonpath={.spec.ipFamilies}").stdout
        assert families == '["IPv4"]', families
        return
    _run(kind, kind_daemon, "dualstack", tmp_path)
