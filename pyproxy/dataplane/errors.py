"""Connection errors, counted and logged at a bounded rate (never a traceback per connection).

Rules kept here:
- Every error is counted in `DataplaneStats.connection_errors` by (stage, error), which
  `/metrics` shows as `pyproxy_connection_errors_total`. Stages: `accept` (the listener),
  `client` (the client was gone or failed before or while it was served), `upstream`
  (an upstream socket could not be made), `dial` (an endpoint failed), `relay` (a socket
  error while bytes flowed), `idle` (closed past its idle timeout), `internal` (a bug in
  a relay callback: the connection is closed, the traceback logged), `loop` (what the
  event loop's exception handler gets: asyncio's own accept errors, say).
- Logging: the first error of a kind (its key) in a window of `interval` seconds is logged
  at once, with its traceback if it has one and it is `internal`; the others of the window
  are counted, and one line per key reports the count when the window ends. A storm of
  a thousand resets is two lines, not a thousand tracebacks.
- Memory is bounded: at most `MAX_KEYS` kinds per window are told apart; the rest are
  folded into one "other" count.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable

MAX_KEYS = 256
INTERVAL = 10.0


def error_name(err: BaseException | None) -> str:
    """A short, stable label for an error: its errno name, else its type."""
    if err is None:
        return "timeout"
    if isinstance(err, OSError) and err.errno is not None:
        return errno.errorcode.get(err.errno, str(err.errno))
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return type(err).__name__


class ErrorLog:
    def __init__(
        self,
        counts: Counter[tuple[str, str]],
        logger: logging.Logger,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts = counts  # cumulative, for the metric
        self.log = logger
        self.interval = interval
        self.clock = clock
        self._window: dict[str, tuple[str, int]] = {}  # key -> (message, suppressed count)
        self._window_started: float | None = None
        self._flush: asyncio.TimerHandle | None = None

    def note(self, stage: str, err: BaseException | None, message: str, key: str | None = None,
             level: int = logging.INFO) -> None:
        """Count one error; log it if it is the first of its kind in this window."""
        name = error_name(err)
        self.counts[(stage, name)] += 1
        key = key or f"{stage}:{name}"
        now = self.clock()
        if self._window_started is None or now - self._window_started >= self.interval:
            self.close()  # the window is over: its counts are logged, its timer is dropped
            self._window_started = now
        seen = self._window.get(key)
        if seen is not None:
            self._window[key] = (seen[0], seen[1] + 1)
            return
        if len(self._window) >= MAX_KEYS:
            key, message = "other", "other connection errors"
            seen = self._window.get(key)
            self._window[key] = (message, seen[1] + 1 if seen else 1)
            return
        self._window[key] = (message, 0)
        traceback = err if stage in ("internal", "loop") and err is not None else None
        self.log.log(level, "%s", message, exc_info=traceback)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests call flush themselves)
        self._flush = loop.call_later(self.interval, self._timer)

    def _timer(self) -> None:
        self._flush = None
        self.flush()
        self._window_started = None

    def flush(self) -> None:
        """Log the counts of the window that ends, one line per kind that repeated."""
        for message, suppressed in self._window.values():
            if suppressed:
                self.log.warning("%s: %d more like it in the last %.0fs", message, suppressed, self.interval)
        self._window.clear()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.flush()
