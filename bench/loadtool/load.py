"""`python -m bench.load`: run one load mode from one or several processes, merge, report.

Rules kept here:
- `main(argv) -> int` holds the logic: exit 0 when the run completed (errors are data, not
  failure), 2 for bad arguments, 1 when a load process failed to report.
- `--procs 1` runs in this process; more fork worker processes (before any event loop
  exists) that start together at a shared CLOCK_MONOTONIC instant; each sends its `Result`
  back on a queue and the parent merges them. The parent waits a bounded time, then
  terminates the workers it started.
- Progress goes to stderr (every 2 s, for runs of 10 s and more unless told otherwise);
  stdout carries only the table or the JSON document.
- Affinity runs a phase, then (with a hook) removes a backend and runs a second phase.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import queue
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from bench.loadtool import affinity, modes, openloop
from bench.loadtool.addrs import share, split_evenly
from bench.loadtool.backend import raise_nofile_limit
from bench.loadtool.client import Tally
from bench.loadtool.loadargs import LoadSpec, SpecError, parse
from bench.loadtool.report import format_summary
from bench.loadtool.results import Result, merge, summarize

START_DELAY = 0.3  # seconds between forking and the common start
PROGRESS_EVERY = 2.0
RUNNERS = {
    "stream": modes.stream, "rr": modes.rr, "crr": modes.crr,
    "latency": openloop.latency, "idle": openloop.idle,
}
Output = tuple[Result, affinity.Observations]


async def _worker_body(spec: LoadSpec, index: int, start_at: float, counters: Any) -> Output:
    tally = Tally(spec.mode)
    ctx = modes.Context(
        spec, index, share(spec.sources, index, spec.procs), start_at, tally,
        max_ops=split_evenly(spec.max_ops, index, spec.procs) if spec.max_ops else None,
    )
    show = spec.procs == 1 and _wants_progress(spec)
    reporter = asyncio.create_task(_report(tally, counters, index, start_at, spec, show))
    observations: affinity.Observations = {}
    await modes.sleep_until(start_at)
    tally.begin(time.monotonic())
    try:
        async with asyncio.timeout(spec.hard_deadline_s):
            if spec.mode == "affinity":
                observations = await affinity.phase(ctx)
            else:
                await RUNNERS[spec.mode](ctx)
    except TimeoutError:
        tally.errors["hard_deadline"] = tally.errors.get("hard_deadline", 0) + 1
        tally.finish(time.monotonic())
    finally:
        reporter.cancel()
    return tally.result(), observations


async def _report(tally: Tally, counters: Any, index: int, start_at: float, spec: LoadSpec, show: bool) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        counters[index] = tally.ops
        if show and time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            _progress(spec, start_at, sum(counters))


def _wants_progress(spec: LoadSpec) -> bool:
    return spec.progress if spec.progress is not None else spec.duration >= 10


def _progress(spec: LoadSpec, start_at: float, ops: int) -> None:
    elapsed = max(0.0, time.monotonic() - start_at)
    print(f"[bench.load {spec.mode}] {elapsed:5.1f}/{spec.duration:g} s  ops {ops:,}",
          file=sys.stderr, flush=True)


def run_worker(spec: LoadSpec, index: int, start_at: float, counters: Any) -> Output:
    import uvloop

    return uvloop.run(_worker_body(spec, index, start_at, counters))


def _child(spec: LoadSpec, index: int, start_at: float, counters: Any, out: Any) -> None:
    try:
        result, observations = run_worker(spec, index, start_at, counters)
        out.put((index, result.to_dict(), observations, ""))
    except BaseException as exc:  # reported to the parent, which decides
        out.put((index, None, {}, f"{type(exc).__name__}: {exc}"))


def run_phase(spec: LoadSpec) -> tuple[Output, list[str]]:
    """Run the spec once over all processes; (merged output, worker failures)."""
    ctx = mp.get_context("fork")
    counters = ctx.Array("q", spec.procs, lock=False)
    start_at = time.monotonic() + (START_DELAY if spec.procs > 1 else 0.0)
    if spec.procs == 1:
        return run_worker(spec, 0, start_at, counters), []
    out = ctx.Queue()
    workers = [ctx.Process(target=_child, args=(spec, i, start_at, counters, out), daemon=True)
               for i in range(spec.procs)]
    for w in workers:
        w.start()
    results: list[Result] = []
    parts: list[affinity.Observations] = []
    failures: list[str] = []
    deadline = start_at + spec.hard_deadline_s + 10
    last = time.monotonic()
    while len(results) + len(failures) < spec.procs and time.monotonic() < deadline:
        try:
            index, data, observations, error = out.get(timeout=0.5)
        except queue.Empty:
            if _wants_progress(spec) and time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                _progress(spec, start_at, sum(counters))
            continue
        if data is None:
            failures.append(f"worker {index}: {error}")
        else:
            results.append(Result.from_dict(data))
            parts.append(observations)
    for w in workers:
        w.join(timeout=2)
        if w.is_alive():
            w.terminate()
            w.join(timeout=2)
    missing = spec.procs - len(results) - len(failures)
    failures += [f"{missing} worker(s) did not report"] if missing else []
    if not results:
        return (Result(spec.mode), {}), failures
    return (merge(results), affinity.merge_observations(parts)), failures


def command_hook(command: str) -> Callable[[], str | None]:
    """A removal hook running a command; its last stdout line (if any) names the backend."""
    def hook() -> str | None:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120, check=True)
        lines = done.stdout.strip().splitlines()
        return lines[-1].strip() if lines else None
    return hook


def run_affinity(spec: LoadSpec, remove_hook: Callable[[], str | None] | None) -> tuple[Result, dict[str, Any], list[str]]:
    (first, before), failures = run_phase(spec)
    if remove_hook is None:
        return first, affinity.analyze(before), failures
    named = remove_hook()
    time.sleep(spec.settle)
    (second, after), more = run_phase(spec)
    report = affinity.analyze(before, after, spec.removed_name or named)
    return replace(merge([first, second]), procs=spec.procs), report, failures + more


def main(argv: list[str] | None = None) -> int:
    try:
        spec = parse(argv)
    except SpecError as exc:
        print(f"bench.load: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    report: dict[str, Any] | None = None
    if spec.mode == "affinity":
        hook = command_hook(spec.remove_hook) if spec.remove_hook else None
        result, report, failures = run_affinity(spec, hook)
    else:
        (result, _), failures = run_phase(spec)
    summary = summarize(result)
    for failure in failures:
        print(f"bench.load: {failure}", file=sys.stderr)
    if spec.json:
        doc = {"spec": asdict(replace(spec, sources=spec.sources[:16])), "sources": len(spec.sources),
               "summary": summary, "affinity": report, "failures": failures, "result": result.to_dict()}
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(format_summary(summary, report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
