"""One supervisor for every long-lived task: watchers, the sync runner, the servers.

Theory of operation:
- `start(name, body)` runs `body(job)` as a named task and keeps a reference to it (no
  task is ever left unreferenced, so none can die unseen). `job` is the task's link back:
  it sets `job.activity` to what it is working on ("reloading manifests: a.yaml") and
  calls `job.up()` once it works (after a restart, the first good cycle). A body that
  handles its own failures (the API watchers retry in threads) sets `job.probe` to say
  when it is broken nonetheless.
- A body that raises is logged once, with its name, its activity and the traceback (a
  failure identical to the one before it gets one line, not another traceback), marked
  down, and restarted after a backoff (0.5 s doubling to 30 s; a body that ran for a
  minute before failing starts again from 0.5 s). A body that returns while the proxy is
  running is restarted the same way: a long-lived task never just ends.
- `down` names the tasks failed and not yet working again; `/healthz` is 503 while it is
  not empty. Stopping (`stop` set, or `close`) cancels everything and waits for it; a
  cancelled body is never counted as a failure.
- No exception is swallowed without a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("pyproxy.supervisor")

Body = Callable[["Job"], Coroutine[Any, Any, None]]
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0


def backoff(failures: int) -> float:
    """Seconds before restart number `failures` (1-based) of a task."""
    return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** max(0, failures - 1)))


class Job:
    """A supervised task's state, shared with its body."""

    def __init__(self, name: str, body: Body) -> None:
        self.name = name
        self.body = body
        self.activity = "starting"
        self.is_down = False
        self.failures = 0
        self.restarts = 0
        self.last_failure: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.probe: Callable[[], bool] = lambda: False  # True: the body reports itself broken

    @property
    def down(self) -> bool:
        return self.is_down or self.probe()

    def up(self) -> None:
        """The body works (again): it no longer counts as down."""
        if self.is_down:
            log.info("%s works again after %d restart(s)", self.name, self.restarts)
        self.is_down = False


class Supervisor:
    def __init__(self, stop: asyncio.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = stop
        self.clock = clock
        self.jobs: dict[str, Job] = {}

    @property
    def down(self) -> tuple[str, ...]:
        return tuple(sorted(name for name, job in self.jobs.items() if job.down))

    def start(self, name: str, body: Body) -> Job:
        job = Job(name, body)
        self.jobs[name] = job
        job.task = asyncio.get_running_loop().create_task(self._keep(job), name=name)
        return job

    async def _keep(self, job: Job) -> None:
        while not self.stop.is_set():
            started = self.clock()
            job.activity = "starting"
            try:
                await job.body(job)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the supervisor is where unexpected errors end up
                self._failed(job, err, started)
            else:
                if self.stop.is_set():
                    return
                self._failed(job, None, started)
            delay = backoff(job.failures)
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            job.restarts += 1

    def _failed(self, job: Job, err: Exception | None, started: float) -> None:
        if self.clock() - started >= STABLE_AFTER:
            job.failures = 0
        job.failures += 1
        job.is_down = True
        summary = "returned unexpectedly" if err is None else f"{type(err).__name__}: {err}"
        delay = backoff(job.failures)
        message = "%s failed while %s: %s; restarting in %.1fs (down until it works again)"
        args = (job.name, job.activity, summary, delay)
        if err is not None and summary != job.last_failure:
            log.error(message, *args, exc_info=err)
        else:
            log.error(message, *args)
        job.last_failure = summary

    async def close(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = [job.task for job in self.jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results):
            if isinstance(result, Exception):
                log.error("%s ended with an error while stopping: %r", task.get_name(), result)
