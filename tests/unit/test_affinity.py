"""ClientIP session affinity and the fresh pick (SPEC.md §4), on an injected clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pyproxy.model.affinity import AffinityTable, Balancer
from pyproxy.model.endpoints import Endpoint

TIMEOUT = 100.0


def ep(ip: str, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port, True, True, False, False)


A, B, C, D = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3"), ep("10.0.0.4")
ABC = (A, B, C)


def addresses(*endpoints: Endpoint) -> set[tuple[str, int]]:
    return {e.address for e in endpoints}


def sticky_balancer(timeout: int = int(TIMEOUT), seed: int = 1, capacity: int = 1000) -> Balancer:
    balancer = Balancer(capacity, rng=random.Random(seed))
    balancer.configure(timeout, addresses(*ABC))
    return balancer


# --- AffinityTable ------------------------------------------------------------------------


def test_lookup_within_timeout_and_after() -> None:
    table = AffinityTable(capacity=10, timeout=TIMEOUT)
    table.record("192.0.2.1", A.address, now=0.0)
    assert table.lookup("192.0.2.1", now=TIMEOUT) == A.address  # exactly at the timeout: still fresh
    assert table.lookup("192.0.2.1", now=TIMEOUT + 0.001) is None
    assert len(table) == 0  # a stale entry found on lookup is dropped
    assert table.lookup("192.0.2.2", now=0.0) is None


def test_key_is_client_ip_only() -> None:
    table = AffinityTable(capacity=10, timeout=TIMEOUT)
    table.record("192.0.2.1", A.address, now=0.0)
    table.record("192.0.2.1", B.address, now=1.0)  # re-pin overwrites
    assert len(table) == 1
    assert table.lookup("192.0.2.1", now=2.0) == B.address


def test_lru_bound_evicts_only_the_least_recently_used_client() -> None:
    table = AffinityTable(capacity=3, timeout=TIMEOUT)
    for i, client in enumerate(["c1", "c2", "c3"]):
        table.record(client, A.address, now=float(i))
    table.record("c1", A.address, now=3.0)  # c1 used again: c2 is now the oldest
    table.record("c4", B.address, now=4.0)
    assert len(table) == 3
    assert table.stats.evictions == 1
    assert table.lookup("c2", now=5.0) is None
    assert [table.lookup(c, now=5.0) for c in ("c1", "c3", "c4")] == [A.address, A.address, B.address]
    for i in range(10):
        table.record(f"flood{i}", C.address, now=6.0)
    assert len(table) == 3 and table.stats.evictions == 11


def test_stale_entries_leave_as_new_clients_arrive_and_are_not_evictions() -> None:
    """Nothing else sweeps the table: without this, departed clients stay counted in the
    table's size forever, and a full table reports their removal as evictions."""
    table = AffinityTable(capacity=3, timeout=TIMEOUT)
    for client in ("old1", "old2", "old3"):
        table.record(client, A.address, now=0.0)
    table.record("new1", B.address, now=TIMEOUT + 1)
    table.record("new2", B.address, now=TIMEOUT + 1)
    assert len(table) == 2  # only the fresh ones remain
    assert table.stats.evictions == 0
    table.record("new3", B.address, now=TIMEOUT + 1)
    table.record("new4", B.address, now=TIMEOUT + 1)  # now the table really is full of fresh pins
    assert len(table) == 3 and table.stats.evictions == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AffinityTable(capacity=0, timeout=TIMEOUT)


def test_retain_drops_entries_of_endpoints_that_left() -> None:
    table = AffinityTable(capacity=10, timeout=TIMEOUT)
    table.record("c1", A.address, now=0.0)
    table.record("c2", B.address, now=0.0)
    table.record("c3", A.address, now=0.0)
    table.retain(addresses(B, C))
    assert len(table) == 1
    assert table.lookup("c2", now=1.0) == B.address
    assert table.lookup("c1", now=1.0) is None


def test_expire_drops_only_stale_entries_up_to_limit() -> None:
    table = AffinityTable(capacity=10, timeout=TIMEOUT)
    for i in range(5):
        table.record(f"c{i}", A.address, now=float(i))
    assert table.expire(now=TIMEOUT + 2.5, limit=1) == 1  # c0 only, limit reached
    assert table.expire(now=TIMEOUT + 2.5) == 2  # c1, c2 are stale; c3 (age 99.5) is not
    assert len(table) == 2
    assert table.expire(now=TIMEOUT + 2.5) == 0


# --- Balancer: stickiness and sliding expiry ----------------------------------------------


def test_sticky_within_timeout() -> None:
    balancer = sticky_balancer()
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    assert first is not None
    picks = {balancer.pick("192.0.2.1", ABC, now=float(t)) for t in range(1, 100, 7)}
    assert picks == {first}
    assert balancer.affinity is not None and balancer.affinity.stats.hits == len(range(1, 100, 7))


def test_client_port_does_not_matter_only_ip() -> None:
    balancer = sticky_balancer()
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    assert all(balancer.pick("192.0.2.1", ABC, now=1.0) == first for _ in range(20))
    # other clients get their own (possibly different) pins, not the first client's
    assert {balancer.pick(f"198.51.100.{i}", ABC, now=1.0) for i in range(60)} == set(ABC)


def test_sliding_expiry_keeps_a_regular_client_pinned_forever() -> None:
    balancer = sticky_balancer()
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    now = 0.0
    for _ in range(200):  # 200 connections, each 0.9 x timeout after the last: 180 timeouts in total
        now += 0.9 * TIMEOUT
        assert balancer.pick("192.0.2.1", ABC, now=now) == first


def test_after_timeout_the_pick_is_fresh_and_eventually_different() -> None:
    """Kubernetes' conformance check: sticky before the timeout, eventually another pod after."""
    balancer = sticky_balancer(seed=7)
    now = 0.0
    first = balancer.pick("192.0.2.1", ABC, now=now)
    seen = set()
    for _ in range(50):
        now += TIMEOUT + 5  # more than the timeout since the last connection (at now + 1)
        chosen = balancer.pick("192.0.2.1", ABC, now=now)
        seen.add(chosen)
        assert balancer.pick("192.0.2.1", ABC, now=now + 1) == chosen  # the fresh pick is pinned again
    assert seen - {first}
    assert balancer.affinity is not None and balancer.affinity.stats.misses >= 50


def test_pin_to_an_endpoint_no_longer_offered_is_a_miss() -> None:
    balancer = sticky_balancer()
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    rest = tuple(e for e in ABC if e != first)
    second = balancer.pick("192.0.2.1", rest, now=1.0)
    assert second in rest
    assert balancer.pick("192.0.2.1", ABC, now=2.0) == second  # the re-pick is the new pin


def test_dial_failure_exclude_repicks_and_overwrites_the_pin() -> None:
    balancer = sticky_balancer()
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    assert first is not None
    retry = balancer.pick("192.0.2.1", ABC, now=1.0, exclude={first.address})
    assert retry is not None and retry != first
    assert balancer.affinity is not None
    assert balancer.affinity.lookup("192.0.2.1", now=1.0) == retry.address
    assert balancer.pick("192.0.2.1", ABC, now=2.0) == retry


def test_every_endpoint_excluded_gives_none() -> None:
    balancer = sticky_balancer()
    assert balancer.pick("192.0.2.1", ABC, now=0.0, exclude=addresses(*ABC)) is None
    assert balancer.pick("192.0.2.1", (), now=0.0) is None


# --- Balancer: configure() takes effect at once -------------------------------------------


def test_affinity_switched_on_and_off_at_once() -> None:
    balancer = Balancer(100, rng=random.Random(3))
    balancer.configure(None, addresses(*ABC))
    assert len({balancer.pick("192.0.2.1", ABC, now=0.0) for _ in range(60)}) == 3  # not sticky
    balancer.configure(10800, addresses(*ABC))
    first = balancer.pick("192.0.2.1", ABC, now=1.0)
    assert {balancer.pick("192.0.2.1", ABC, now=2.0) for _ in range(60)} == {first}
    balancer.configure(None, addresses(*ABC))
    assert balancer.affinity is None
    assert len({balancer.pick("192.0.2.1", ABC, now=3.0) for _ in range(60)}) == 3


@pytest.mark.parametrize("seed", [None, "cluster-seed"])
def test_uniform_means_the_pick_is_a_plain_draw_the_relay_may_make_itself(seed: str | None) -> None:
    """`uniform` is the licence the compiled engine draws under: while it holds, the same
    draw from another source of randomness gives the same distribution and loses no state."""
    balancer = Balancer(100, rng=random.Random(7), consistent_seed=seed)
    balancer.configure(None, addresses(*ABC))
    assert balancer.uniform
    picks = Counter(balancer.pick(f"192.0.2.{i % 5}", ABC, now=float(i)) for i in range(3000))
    assert set(picks) == set(ABC) and min(picks.values()) > 900  # every client spread over all three
    assert balancer.affinity is None  # nothing recorded
    balancer.configure(10800, addresses(*ABC))
    assert not balancer.uniform  # pins are read and written: every pick is the model's
    balancer.configure(None, addresses(*ABC))
    assert balancer.uniform


def test_shorter_timeout_applies_to_existing_pins() -> None:
    balancer = sticky_balancer(timeout=10800)
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    balancer.configure(10, addresses(*ABC))
    assert balancer.affinity is not None and balancer.affinity.timeout == 10
    assert balancer.pick("192.0.2.1", ABC, now=5.0) == first
    assert balancer.affinity.lookup("192.0.2.1", now=16.0) is None  # 11 s since the last connection


def test_longer_timeout_applies_to_existing_pins() -> None:
    balancer = sticky_balancer(timeout=10)
    first = balancer.pick("192.0.2.1", ABC, now=0.0)
    balancer.configure(3600, addresses(*ABC))
    assert all(balancer.pick("192.0.2.1", ABC, now=float(t)) == first for t in range(100, 3000, 700))


def test_configure_drops_pins_to_endpoints_that_left() -> None:
    balancer = sticky_balancer()
    clients = [f"198.51.100.{i}" for i in range(30)]
    pins = {c: balancer.pick(c, ABC, now=0.0) for c in clients}
    balancer.configure(int(TIMEOUT), addresses(A, B))
    assert balancer.affinity is not None
    assert len(balancer.affinity) == sum(1 for p in pins.values() if p != C)


# --- Fresh picks: evenness and consistent hashing ------------------------------------------


@pytest.mark.parametrize("affinity", [None, 10800])
def test_fresh_picks_are_even(affinity: int | None) -> None:
    balancer = Balancer(100_000, rng=random.Random(12345))
    balancer.configure(affinity, addresses(*ABC))
    counts: Counter[Endpoint | None] = Counter()
    for i in range(30_000):
        client = "192.0.2.1" if affinity is None else f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        counts[balancer.pick(client, ABC, now=0.0)] += 1
    assert set(counts) == set(ABC)
    for endpoint in ABC:
        assert abs(counts[endpoint] / 30_000 - 1 / 3) < 0.02, counts


def consistent(seed: str = "cluster-seed") -> Balancer:
    balancer = Balancer(100_000, rng=random.Random(), consistent_seed=seed)
    balancer.configure(10800, addresses(A, B, C, D))
    return balancer


CLIENTS = [f"203.0.113.{i}" for i in range(200)]


def test_consistent_first_pick_is_the_same_on_every_node_whatever_the_order() -> None:
    node1, node2 = consistent(), consistent()
    order1, order2 = (A, B, C, D), (D, B, A, C)
    picks1 = [node1.pick(c, order1, now=0.0) for c in CLIENTS]
    picks2 = [node2.pick(c, order2, now=0.0) for c in CLIENTS]
    assert picks1 == picks2
    assert set(picks1) == {A, B, C, D}  # and it spreads clients over all endpoints


def test_consistent_pick_depends_on_the_seed() -> None:
    picks1 = [consistent("one").pick(c, (A, B, C, D), now=0.0) for c in CLIENTS]
    picks2 = [consistent("two").pick(c, (A, B, C, D), now=0.0) for c in CLIENTS]
    assert picks1 != picks2


def test_consistent_removing_an_endpoint_moves_only_its_clients() -> None:
    before = {c: consistent().pick(c, (A, B, C, D), now=0.0) for c in CLIENTS}
    after = {c: consistent().pick(c, (A, B, D), now=0.0) for c in CLIENTS}
    moved = {c for c in CLIENTS if before[c] != after[c]}
    assert moved == {c for c in CLIENTS if before[c] == C}
    assert moved  # C had clients to lose


def test_consistent_mode_still_expires_per_node() -> None:
    """The table governs stickiness; after expiry the consistent pick is made again."""
    balancer = consistent()
    first = balancer.pick("203.0.113.9", (A, B, C, D), now=0.0)
    assert balancer.pick("203.0.113.9", (A, B, C, D), now=20000.0) == first
    assert balancer.affinity is not None and balancer.affinity.stats.misses == 2
