"""When the supervisor starts a serving process again after one died: pure decisions.

Rules kept here (no I/O, no clock of its own: every call is given `now`):
- A death is respawned at once: the listeners are held by the supervisor, so connections
  queue in the kernel meanwhile and every millisecond of delay is a millisecond of queue.
- Only a crash loop is slowed down: from the `LOOP_DEATHS`-th death within `LOOP_WINDOW`
  seconds on, each further start waits `FIRST_BACKOFF` doubling up to `MAX_BACKOFF`. A
  process that served for `STABLE_AFTER` seconds before dying resets the count: a crash a
  day is never a loop.
- A process that exited with a failure status before any process served since the
  supervisor started is a start-up error (bad input, bad config): a restart cannot fix
  it, so the supervisor exits with its status instead of looping (`give_up`). One killed
  by a signal then (kill -9, the OOM killer, a segfault) is a crash like any other.
- `in_loop` is what /healthz and the logs report: true from the loop's first back-off until
  a process has served for `STABLE_AFTER` seconds again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOOP_DEATHS = 3  # deaths within LOOP_WINDOW that make a crash loop
LOOP_WINDOW = 60.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # seconds of serving after which earlier deaths are forgotten


@dataclass
class RespawnPolicy:
    deaths: list[float] = field(default_factory=list)  # recent deaths (monotonic seconds), oldest first
    served_once: bool = False  # some process served since the supervisor started
    serving_since: float | None = None  # the current process serves since then
    restarts: int = 0  # processes started after a death, ever

    def served(self, now: float) -> None:
        """The current process serves (it said so on its control channel)."""
        self.served_once = True
        self.serving_since = now

    def stable(self, now: float) -> None:
        """Called now and then: a process that served long enough clears the loop."""
        if self.serving_since is not None and now - self.serving_since >= STABLE_AFTER:
            self.deaths.clear()

    def died(self, now: float) -> float:
        """A serving process died unasked: seconds to wait before starting the next one."""
        if self.serving_since is not None and now - self.serving_since >= STABLE_AFTER:
            self.deaths.clear()
        self.serving_since = None
        self.deaths = [t for t in self.deaths if now - t < LOOP_WINDOW] + [now]
        self.restarts += 1
        return self.delay()

    def delay(self) -> float:
        beyond = len(self.deaths) - LOOP_DEATHS
        if beyond < 0:
            return 0.0
        return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** beyond))

    def give_up(self, code: int) -> bool:
        """Exit status `code` (negative: killed by that signal) of a process that never
        served, before any served: a start-up error, not a crash."""
        return not self.served_once and code > 0

    def in_loop(self) -> bool:
        return len(self.deaths) >= LOOP_DEATHS
