"""The compiled engine serves a destination from decide()'s plan until its route changes.

A plan (engine.c's "Plans") lets the engine serve connections without calling Python: it
draws uniformly from the plan's targets and counts the pair as decide() and closed() would.
What a user would check: the connections are spread over every endpoint, each is relayed
whole, the port's counters add up, and a change of the route is seen by the very next
connection, whether it changes the endpoints or removes the service. The engine is driven by
tests/kernel/engine_plans.py in a namespace of this test's own, removed afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import private_netns, privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]
PER_PHASE = 60
REQUEST_BYTES = 1001


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, Any]]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-plans-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.kernel.engine_plans"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        yield json.loads(done.stdout)


def test_a_plan_serves_every_connection_after_the_first_spread_over_all_endpoints(report: dict[str, Any]) -> None:
    planned = report["planned"]
    assert planned["decide_calls"] == 1, planned
    assert planned["echoed"] == PER_PHASE, planned
    assert sum(planned["served"]) == PER_PHASE and min(planned["served"]) >= 5, planned  # uniform: ~20 each


def test_planned_pairs_are_counted_as_decide_and_closed_count(report: dict[str, Any]) -> None:
    planned = report["planned"]
    assert (planned["total"], planned["active"]) == (PER_PHASE, 0), planned
    assert planned["bytes_in"] == planned["bytes_out"] == PER_PHASE * REQUEST_BYTES, planned


def test_a_new_route_is_seen_by_the_next_connection(report: dict[str, Any]) -> None:
    changed = report["changed"]
    assert changed["decide_calls"] == 1, changed  # asked once, then the new plan serves
    assert changed["served"] == [0, 0, PER_PHASE], changed  # none went to the endpoints that left
    assert changed["echoed"] == PER_PHASE and changed["active"] == 0, changed


def test_a_removed_route_is_refused_from_the_next_connection_on(report: dict[str, Any]) -> None:
    removed = report["removed"]
    assert removed["decide_calls"] == PER_PHASE, removed  # no plan outlives its route
    assert removed["served"] == [0, 0, 0] and removed["echoed"] == 0, removed
    assert removed["total"] == 2 * PER_PHASE and removed["active"] == 0, removed
