"""The supervisor's respawn decisions (pyproxy/lifecycle/respawn.py), on a fake clock."""

from __future__ import annotations

import json

from pyproxy.lifecycle.respawn import LOOP_WINDOW, MAX_BACKOFF, STABLE_AFTER, RespawnPolicy


def test_a_death_is_respawned_at_once_and_only_a_loop_backs_off() -> None:
    policy = RespawnPolicy()
    policy.served(0.0)
    delays = []
    for i in range(7):
        delays.append(policy.died(1.0 + i))
        policy.served(1.0 + i + 0.5)
    assert delays == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert policy.in_loop() and policy.restarts == 7


def test_the_back_off_is_bounded() -> None:
    policy = RespawnPolicy(served_once=True)
    delay = 0.0
    for i in range(30):
        delay = policy.died(float(i))  # never served in between: each start died young
    assert delay == MAX_BACKOFF


def test_deaths_far_apart_are_no_loop() -> None:
    policy = RespawnPolicy()
    policy.served(0.0)
    now = 0.0
    for _ in range(10):
        now += LOOP_WINDOW + 1
        assert policy.died(now) == 0.0
        assert not policy.in_loop()
        policy.served(now + 0.1)


def test_serving_for_a_while_forgets_the_loop() -> None:
    policy = RespawnPolicy()
    policy.served(0.0)
    for i in range(4):
        policy.died(float(i))
    assert policy.in_loop()
    policy.served(10.0)
    policy.stable(10.0 + STABLE_AFTER - 1)
    assert policy.in_loop()
    policy.stable(10.0 + STABLE_AFTER)
    assert not policy.in_loop()
    assert policy.died(10.0 + STABLE_AFTER + 1) == 0.0


def test_a_first_process_that_failed_before_serving_is_a_start_up_error() -> None:
    policy = RespawnPolicy()
    assert policy.give_up(1) and policy.give_up(2)
    assert not policy.give_up(-9)  # killed before serving (mid hand-over, say): a crash, respawned
    policy.served(0.0)
    policy.died(1.0)
    assert not policy.give_up(1)  # once one served, a death before serving is a crash, respawned


def test_the_supervisors_health_answer_while_no_process_serves() -> None:
    from pyproxy.lifecycle.master import health_answer

    policy = RespawnPolicy()
    policy.served(0.0)
    for i in range(4):
        policy.died(float(i))
    answer = health_answer(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", policy, 5.0, 4.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Content-Length: %d" % len(body) in head
    doc = json.loads(body)
    assert doc["crashLoop"] is True and doc["restarts"] == 4 and doc["nextStartSeconds"] == 1.0
    assert health_answer(b"GET /livez HTTP/1.1\r\n\r\n", policy, 5.0, 4.0).startswith(b"HTTP/1.1 200 ")
    assert health_answer(b"", policy, None, 4.0).startswith(b"HTTP/1.1 503 ")
