"""One sync runner (kube-proxy's BoundedFrequencyRunner), on an injected clock.

Rules kept here:
- Events only nudge (`request()`); the runner decides when to sync.
- Never more often than `min_interval`; at least every `max_interval` even without
  nudges; after a failed sync, again after `retry_interval`.
- A failed sync logs its traceback once; the same failure again is one line per retry.
- `pending_since` is when the oldest unapplied nudge arrived: health reads it to tell a
  stale data plane from a quiet one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("pyproxy.sync")


class SyncRunner:
    def __init__(
        self,
        sync: Callable[[], Awaitable[None]],
        min_interval: float,
        max_interval: float,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self.pending_since: float | None = None
        self.last_run: float | None = None
        self.last_success: float | None = None
        self.applying_since: float | None = None  # the pending_since a running sync took
        self.last_failure: str | None = None
        self._wake = asyncio.Event()

    def request(self) -> None:
        if self.pending_since is None:
            self.pending_since = self.clock()
        self._wake.set()

    @property
    def oldest_unapplied(self) -> float | None:
        """When the oldest change not yet applied arrived, counting one a running sync holds."""
        times = [t for t in (self.pending_since, self.applying_since) if t is not None]
        return min(times) if times else None

    def next_delay(self, now: float, failed: bool) -> float:
        """Seconds until the next sync should start (pure)."""
        if self.last_run is None:
            return 0.0
        if failed:
            return max(0.0, self.last_run + self.retry_interval - now)
        if self.pending_since is not None:
            return max(0.0, self.last_run + self.min_interval - now)
        return max(0.0, self.last_run + self.max_interval - now)

    async def run(self, stop: asyncio.Event) -> None:
        failed = False
        while not stop.is_set():
            delay = self.next_delay(self.clock(), failed)
            if delay > 0:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                done, pending = await asyncio.wait({waiter, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if stop.is_set():
                    return
                if waiter in done and self.next_delay(self.clock(), failed) > 0:
                    continue
            failed = not await self._run_once()

    async def run_now(self) -> bool:
        """One sync at once, outside `run()` (start-up with a complete store: the table before
        the listener); True if it succeeded. A failure is retried by `run()` as usual."""
        return await self._run_once()

    async def _run_once(self) -> bool:
        started = self.clock()
        self.last_run = started
        pending = self.pending_since
        self.pending_since = None
        self.applying_since = pending
        try:
            await self._sync()
        except Exception as err:
            summary = f"{type(err).__name__}: {err}"
            if summary != self.last_failure:  # a traceback for a new failure, one line for each repeat
                log.exception("sync failed; retrying in %.1fs", self.retry_interval)
            else:
                log.error("sync failed again (%s); retrying in %.1fs", summary, self.retry_interval)
            self.last_failure = summary
            if pending is not None:  # still the oldest unapplied change, even if more came meanwhile
                self.pending_since = pending
            elif self.pending_since is None:
                self.pending_since = started
            return False
        finally:
            self.applying_since = None
        self.last_success = self.clock()
        self.last_failure = None
        return True
