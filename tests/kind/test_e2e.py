"""The conformance tier: Kubernetes' own e2e specs against pyproxy in the kind cluster.

Kubernetes proves kube-proxy with these specs (kind's e2e job runs them); here they run
against the same cluster as the rest of the kind tier, once per pod network: on the
dual-stack (routed) cluster the focused set and the dual-stack Service specs in one ginkgo
run, on the bridge cluster the focused set (tests/kind/e2e.py `SELECTIONS`). Every selected
spec must run and pass: a spec the suite skipped, or one missing from the report, fails the
test as surely as a failed one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.kind import e2e
from tests.kind.cluster import DUAL_STACK, Cluster
from tests.kind.dockerd import Daemon

pytestmark = pytest.mark.timeout(1800)


def _selection_for(kind: Cluster) -> tuple[str, list[str]]:
    """The CI selection of this cluster and the specs it must pass."""
    if kind.cni in DUAL_STACK:
        name = "focused+dualstack"
        parts = set(e2e.list_specs(e2e.SELECTIONS["focused"])) | set(e2e.list_specs(e2e.SELECTIONS["dualstack"]))
        wanted = e2e.list_specs(e2e.SELECTIONS[name])
        # the combined regexes must pick exactly the two sets, no more, no fewer
        assert set(wanted) == parts, (sorted(set(wanted) ^ parts))
        return name, wanted
    return "focused", e2e.list_specs(e2e.SELECTIONS["focused"])


def test_the_e2e_specs_of_a_service_proxy_pass(kind: Cluster, kind_daemon: Daemon, tmp_path: Path) -> None:
    name, wanted = _selection_for(kind)
    assert len(wanted) >= 30, f"the {name} selection picks only {len(wanted)} specs from e2e.test: {wanted}"
    e2e.prepare(kind, kind_daemon)
    result = e2e.run(kind, kind_daemon, e2e.SELECTIONS[name], tmp_path)
    print(f"\n[e2e {name} {kind.cni}] {result.summary()}", file=sys.stderr)
    assert not result.failed, "\n".join(f"{spec}:\n  {why}" for spec, why in result.failed.items())
    assert not result.skipped, result.skipped
    ran = {spec.removeprefix("[It] ") for spec in result.passed}
    assert len(result.passed) == len(wanted), (len(result.passed), sorted(set(wanted) - ran))
