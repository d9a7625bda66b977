"""The supervisor: failures logged once with what the task was doing, restarts with backoff,
`down` (and so /healthz) while a task is failed; and the rate-limited error log."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from pyproxy.dataplane.errors import ErrorLog
from pyproxy.observe import health
from pyproxy.supervisor import Job, Supervisor, backoff


def test_backoff_doubles_to_a_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(100) == 30.0


async def test_a_failing_task_is_logged_with_its_activity_restarted_and_down_until_it_works(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pyproxy.supervisor.FIRST_BACKOFF", 0.01)
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    supervisor = Supervisor(stop)
    runs: list[int] = []
    states: list[tuple[str, ...]] = []

    async def body(job: Job) -> None:
        runs.append(job.restarts)
        job.activity = "reloading manifests (a.yaml)"
        if len(runs) <= 3:
            raise RecursionError("maximum recursion depth exceeded")
        job.up()
        await stop.wait()

    supervisor.start("manifest-watch", body)
    for _ in range(200):
        states.append(supervisor.down)
        if len(runs) >= 4 and not supervisor.down:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await supervisor.close()
    assert runs == [0, 1, 2, 3]
    assert ("manifest-watch",) in states and supervisor.down == ()
    failures = [r for r in caplog.records if "failed while" in r.getMessage()]
    assert len(failures) == 3
    assert failures[0].getMessage().startswith(
        "manifest-watch failed while reloading manifests (a.yaml): RecursionError: maximum recursion depth exceeded")
    assert [r.exc_info is not None for r in failures] == [True, False, False], "one traceback, then one line each"
    assert "manifest-watch works again after 3 restart(s)" in caplog.text


async def test_a_task_that_returns_is_restarted_and_a_cancel_is_no_failure(caplog: pytest.LogCaptureFixture,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyproxy.supervisor.FIRST_BACKOFF", 0.01)
    stop = asyncio.Event()
    supervisor = Supervisor(stop)
    runs = 0

    async def body(job: Job) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            return
        await asyncio.sleep(3600)

    supervisor.start("sync-runner", body)
    for _ in range(100):
        if runs >= 2:
            break
        await asyncio.sleep(0.01)
    await supervisor.close()
    assert runs == 2
    assert "sync-runner failed while starting: returned unexpectedly" in caplog.text
    assert caplog.text.count("failed while") == 1


def test_healthz_is_503_while_a_task_is_down() -> None:
    state = health.ProxyState(pending_since=None, last_success=1.0, node=None, timeout=60, down=("manifest-watch",))
    response = health.healthz(2.0, state)
    assert response.status == 503 and response.json()["down"] == ["manifest-watch"]
    assert health.livez(2.0, state).status == 200  # a restart would not help: the supervisor restarts it
    assert health.healthz(2.0, health.ProxyState(None, 1.0, None, 60)).status == 200


def test_error_log_logs_the_first_of_a_kind_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    counts: Counter[tuple[str, str]] = Counter()
    errors = ErrorLog(counts, logging.getLogger("test.errors"), interval=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO)
    for _ in range(1000):
        errors.note("client", ConnectionResetError(104, "reset"), "clients reset their connections")
    errors.note("dial", None, "dial 10.0.0.1:80 failed: timeout", key="dial 10.0.0.1:80")
    now[0] = 11.0
    errors.note("client", ConnectionResetError(104, "reset"), "clients reset their connections")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "clients reset their connections",
        "dial 10.0.0.1:80 failed: timeout",
        "clients reset their connections: 999 more like it in the last 10s",
        "clients reset their connections",
    ]
    assert counts == {("client", "ECONNRESET"): 1001, ("dial", "timeout"): 1}


def test_error_log_is_bounded_in_kinds(caplog: pytest.LogCaptureFixture) -> None:
    counts: Counter[tuple[str, str]] = Counter()
    errors = ErrorLog(counts, logging.getLogger("test.errors"), clock=lambda: 0.0)
    caplog.set_level(logging.INFO)
    for i in range(5000):
        errors.note("dial", None, f"dial 10.0.{i // 250}.{i % 250}:80 failed", key=str(i))
    errors.flush()
    assert len(caplog.records) <= 258
    assert "other connection errors: " in caplog.text
