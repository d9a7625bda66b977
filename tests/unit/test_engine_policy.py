"""The compiled engine's copy/splice policy answers as model/copymode.py's CopyPolicy does.

The engine (pyproxy/dataplane/_native/engine.c) carries the policy's three numbers and its
own few lines of arithmetic; `_engine.policy` exposes them, and this table holds the two to
the same answers, including the edges (splice at once, never, exactly at the thresholds).
"""

from __future__ import annotations

import random

import pytest

from pyproxy.dataplane import engine
from pyproxy.model.copymode import SPLICE_NOW, CopyPolicy
from tests.conftest import skip_or_fail

COPY_READ, SPLICE_ROUND, BACK_TO_COPY = 0, 1, 2

POLICIES = [CopyPolicy(), CopyPolicy(splice_after=0), CopyPolicy(splice_after=-1),
            CopyPolicy(splice_after=16384, bulk_read=16384, copy_after=1), CopyPolicy(splice_after=1, bulk_read=1)]


@pytest.fixture(scope="module")
def native() -> object:
    if engine.native is None:
        skip_or_fail("the compiled engine is not built (cmd/setup builds it; PYPROXY_PURE_PYTHON=1 hides it)")
    return engine.native


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"after={p.splice_after},bulk={p.bulk_read},copy={p.copy_after}")
def test_engine_policy_matches_the_model(native: object, policy: CopyPolicy) -> None:
    rng = random.Random(12)
    numbers = (policy.splice_after, policy.bulk_read, policy.copy_after)
    sizes = [0, 1, policy.bulk_read - 1, policy.bulk_read, policy.bulk_read + 1, 65536, 262144]
    sizes += [rng.randrange(1, 300000) for _ in range(200)]
    for n in sizes:
        for streak in (0, 1, policy.bulk_read, max(0, policy.splice_after - n), 50000):
            assert native.policy(*numbers, COPY_READ, streak, n) == policy.copy_read(streak, n), (streak, n)  # type: ignore[attr-defined]
        for small in range(0, policy.copy_after + 2):
            assert native.policy(*numbers, SPLICE_ROUND, small, n) == policy.splice_round(small, n), (small, n)  # type: ignore[attr-defined]
    for small in range(0, policy.copy_after + 3):
        assert bool(native.policy(*numbers, BACK_TO_COPY, small, 0)) == policy.back_to_copy(small)  # type: ignore[attr-defined]
    assert native.SPLICE_NOW == SPLICE_NOW  # type: ignore[attr-defined]
