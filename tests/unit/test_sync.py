"""The sync runner (kube-proxy's BoundedFrequencyRunner): pure timing, then a short real run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from pyproxy.sync import SyncRunner


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def nothing() -> None:
    return None


def runner_at(clock: FakeClock, last_run: float | None) -> SyncRunner:
    runner = SyncRunner(nothing, min_interval=1.0, max_interval=30.0, retry_interval=5.0, clock=clock)
    runner.last_run = last_run
    return runner


# --- next_delay: pure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_run", "nudged", "failed", "now", "expected"),
    [
        (None, False, False, 1000.0, 0.0),  # never synced: sync at once
        (None, True, True, 1000.0, 0.0),
        (1000.0, True, False, 1000.25, 0.75),  # nudged: not before min_interval after the last run
        (1000.0, True, False, 1001.0, 0.0),
        (1000.0, True, False, 1009.0, 0.0),  # overdue: at once, never negative
        (1000.0, False, False, 1000.0, 30.0),  # quiet: max_interval after the last run
        (1000.0, False, False, 1029.5, 0.5),
        (1000.0, False, False, 1031.0, 0.0),
        (1000.0, False, True, 1002.0, 3.0),  # failed: retry_interval after the last run
        (1000.0, True, True, 1002.0, 3.0),  # a nudge does not hurry a retry
        (1000.0, False, True, 1006.0, 0.0),
    ],
)
def test_next_delay(last_run: float | None, nudged: bool, failed: bool, now: float, expected: float) -> None:
    clock = FakeClock(now)
    runner = runner_at(clock, last_run)
    if nudged:
        runner.request()
    assert runner.next_delay(now, failed) == pytest.approx(expected)


def test_pending_since_is_the_oldest_nudge() -> None:
    clock = FakeClock(50.0)
    runner = runner_at(clock, None)
    assert runner.pending_since is None
    runner.request()
    clock.now = 51.0
    runner.request()
    assert runner.pending_since == 50.0


# --- a real run, under asyncio and uvloop (tests/unit/conftest.py) ------------------------


async def run_until(runner: SyncRunner, done: Callable[[], bool], limit: float = 3.0) -> asyncio.Event:
    """Start the runner and wait (bounded) until `done()`; returns its stop event, still running."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop), name="sync-runner")
    deadline = time.monotonic() + limit
    while not done():
        assert not task.done(), task
        assert time.monotonic() < deadline, "runner did not get there in time"
        await asyncio.sleep(0.005)
    runner.stop_task = task  # type: ignore[attr-defined]
    return stop


async def finish(runner: SyncRunner, stop: asyncio.Event) -> None:
    stop.set()
    task: asyncio.Task[None] = runner.stop_task  # type: ignore[attr-defined]
    await asyncio.wait_for(task, 1.0)


def recorder(fail_times: int = 0, during: Callable[[], None] = lambda: None
             ) -> tuple[list[float], Callable[[], Awaitable[None]]]:
    starts: list[float] = []

    async def sync() -> None:
        starts.append(time.monotonic())
        await asyncio.sleep(0)
        if len(starts) <= fail_times:
            during()
            raise RuntimeError("nft -f - failed")

    return starts, sync


async def test_nudges_coalesce_and_respect_min_interval() -> None:
    """Fifty nudges, each in its own turn of the loop: one sync per min_interval of the time
    they took (one, unless the loop was starved for longer than that; one more when the
    first nudge comes min_interval after the first sync, which may run at once), none before
    min_interval, the last nudge applied, and nothing after it without a new nudge. Each
    condition is waited for, bounded; no fixed sleep decides what ran (it made this test
    flaky on a loaded machine)."""
    starts, sync = recorder()
    runner = SyncRunner(sync, min_interval=0.1, max_interval=60.0, retry_interval=0.05)
    stop = await run_until(runner, lambda: len(starts) == 1)  # the first sync runs at once
    first_nudge = time.monotonic()
    for _ in range(50):
        runner.request()
        await asyncio.sleep(0)
    last_nudge = time.monotonic()
    await run_until_more(runner, lambda: starts[-1] > last_nudge and runner.pending_since is None)
    settled = len(starts)
    await asyncio.sleep(3 * 0.1)  # three min_intervals with no nudge: no sync may start
    assert len(starts) == settled
    syncs_for_nudges = len(starts) - 1
    # a first nudge later than min_interval after the first sync (a starved test) may sync at once
    immediate = 1 if first_nudge - starts[0] >= 0.1 else 0
    allowed = immediate + 1 + int((last_nudge - first_nudge) / 0.1)
    assert 1 <= syncs_for_nudges <= allowed, (starts, first_nudge, last_nudge)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(gap >= 0.1 - 0.005 for gap in gaps), gaps  # not before min_interval
    await finish(runner, stop)


async def test_max_interval_syncs_without_nudges() -> None:
    starts, sync = recorder()
    runner = SyncRunner(sync, min_interval=0.01, max_interval=0.05, retry_interval=0.01)
    stop = await run_until(runner, lambda: len(starts) >= 4)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(gap >= 0.05 - 0.005 for gap in gaps), gaps
    await finish(runner, stop)


async def test_failing_sync_is_retried_and_keeps_pending_since() -> None:
    runner: SyncRunner
    taken: list[float | None] = []

    def nudge_during_failure() -> None:
        taken.append(runner.applying_since)
        runner.request()  # an event arrives while the sync is failing

    starts, sync = recorder(fail_times=2, during=nudge_during_failure)
    runner = SyncRunner(sync, min_interval=0.01, max_interval=60.0, retry_interval=0.05)
    runner.request()
    first_nudge = runner.pending_since
    assert first_nudge is not None
    stop = await run_until(runner, lambda: len(starts) == 2)
    # the change from before the first failure is still the oldest unapplied one
    assert runner.pending_since == first_nudge or runner.applying_since == first_nudge
    await run_until_more(runner, lambda: runner.last_success is not None)
    assert len(starts) == 3
    assert taken == [first_nudge, first_nudge]
    assert all(b - a >= 0.05 - 0.005 for a, b in zip(starts, starts[1:]))  # retry_interval apart
    assert runner.pending_since is None
    await asyncio.sleep(0.1)
    assert len(starts) == 3  # once applied, quiet until max_interval
    await finish(runner, stop)


async def run_until_more(runner: SyncRunner, done: Callable[[], bool], limit: float = 3.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "runner did not get there in time"
        await asyncio.sleep(0.005)


async def test_periodic_sync_failure_marks_pending() -> None:
    starts, sync = recorder(fail_times=1)
    runner = SyncRunner(sync, min_interval=0.01, max_interval=60.0, retry_interval=0.02)
    stop = await run_until(runner, lambda: runner.last_success is not None)
    assert len(starts) == 2
    assert runner.pending_since is None
    await finish(runner, stop)


async def test_stop_ends_a_waiting_runner_promptly() -> None:
    starts, sync = recorder()
    runner = SyncRunner(sync, min_interval=0.01, max_interval=60.0)
    stop = await run_until(runner, lambda: len(starts) == 1)
    began = time.monotonic()
    await finish(runner, stop)
    assert time.monotonic() - began < 0.5
