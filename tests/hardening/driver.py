"""The hardening driver: thousands of seeded random connections through one relay, checked.

    python -m tests.hardening.driver [--relay engine|twin] [--loop uvloop|asyncio]
        [--seconds S] [--count N] [--seed N] [--scenarios a,b] [--exclude c,d] [--cases 12,40]

Runs as root; makes a network namespace of its own (removed on the way out) and runs
itself inside it (`--inside`). There: the backends of scenarios.py (threads of this
process; `hole1`/`hole2` drop every SYN and `lossy` half of them, by nftables rules in the
namespace, so dials time out, and a lossy SYN's retransmission lands on the first dial
timeout), and the relay under test in a process of its own (peer.py). Cases (scenarios.py)
run `--concurrency` at a time in rounds; the run ends after `--seconds` or `--count` cases.

Conditions (scenarios.CONDITIONS, selected like the scenarios):
- `handover`: in about half the rounds, mid-round, a new relay process starts, new cases go
  to it, and the old one hands its pairs over (pyproxy's hand-over code, fds over a unix
  socket) with its fd limit squeezed to a random few free fds, so detach may meet EMFILE
  part-way; it then drains what is left and reports. It hands over once every case sent
  to it has been accepted. A case on it may be refused only if the squeeze could have hit
  it (a redial finding no fd).
- `garbage-adopt`: at each quiet point the relay is asked to adopt bad states (peer.py).
- `stall`: the relay's event loop stalls a few ms now and then.
- `sigpipe`: the engine's process runs with SIGPIPE at its default action (engine only).
After every round (a quiet point: no case open) and at the end, the relay in service must
hold no pair, no TCP socket but its listener, no pipe, and as many fds as at its first quiet
point; RSS and Python's allocated blocks may not grow past a bound from there; a relay
that handed over must end with no pair cut, no socket and no pipe; no relay may print a
traceback or an exception it could not raise. Every failure names
the case, its scenario, and the command that replays it (the same seed, `--cases`).
Exit status 0 only if nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hardening.actor import Actor, Outcome
from tests.hardening.rig import (
    CASE_DEADLINE, DIAL_TIMEOUTS, ROOT, Backends, RelayGone, RelayProcess, accept_queue, stray,
)
from tests.hardening.scenarios import BACKEND_PORT, BACKENDS, CONDITIONS, LIVE, SCENARIOS, SERVICES, Case, judge, make_case

ROUND_CASES = 8  # per unit of concurrency
# RSS growth allowed from a relay's first quiet point (under ASan freed memory sits in its
# quarantine, bounded to 32 MiB in the relay processes, before it is reused)
RSS_BOUND = (96 if os.environ.get("PYPROXY_SANITIZED") == "1" else 32) << 20
BLOCKS_PER_CASE = 0.5  # Python blocks allowed to grow per case served, past a floor
BLOCKS_FLOOR = 5000
NFT_RULES = f"""
table inet hardening {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr {{ {BACKENDS['hole1']}, {BACKENDS['hole2']} }} tcp dport {BACKEND_PORT} drop
        ip daddr {BACKENDS['lossy']} tcp dport {BACKEND_PORT} tcp flags & (syn | ack) == syn numgen random mod 2 == 0 drop
    }}
}}
"""


# ---- the run ----

@dataclass
class Result:
    case: Case
    generation: int
    connected_at: float
    client: Outcome
    seen: bool
    backend: Outcome | None
    failure: str | None = None


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    cases: dict[int, Case] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    relays: list[RelayProcess] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def current(self) -> RelayProcess:
        return self.relays[-1]

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)
        print(f"[driver] FAIL {text}", file=sys.stderr, flush=True)


def run_case(run: Run, backends: Backends, case: Case) -> None:
    with run.lock:
        relay = run.current
        relay.connecting += 1
    connected_at = time.monotonic()
    chunk, pause = case.client_read
    try:
        try:
            sock = socket.create_connection((SERVICES[case.service], relay.port), timeout=5)
        finally:
            with run.lock:
                relay.connecting -= 1
        outcome = Actor(sock, list(case.client), time.monotonic() + CASE_DEADLINE, chunk, pause).run()
    except OSError as err:
        outcome = Outcome(reset=True, send_error=f"connect: {err}", ended_at=time.monotonic())
    seen, backend = backends.outcome(case.id, 10.0)
    result = Result(case, relay.generation, connected_at, outcome, seen, backend)
    allowed = relay.squeezed
    if seen and backend is None:
        result.failure = "backend end still open 10 s after the client's end"
    else:
        result.failure = judge(case, outcome, backend, allowed)
    if case.kind == "refused" and result.failure is None and outcome.ended_at - connected_at > case.refuse_within:
        result.failure = f"refused only after {outcome.ended_at - connected_at:.1f} s (bound {case.refuse_within} s)"
    with run.lock:
        run.results.append(result)
        relay.served += 1
    if result.failure:
        run.fail(f"case {case.id} [{case.scenario} via {case.service}, relay {relay.generation}]: {result.failure}")


def settled(run: Run, old: RelayProcess) -> None:
    """Wait (bounded) until every case that chose `old` has connected and `old` has accepted
    them all: from then on none can meet its listener closing (this driver's relays have
    a listener each; pyproxy's hand-over passes its listener on instead)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with run.lock:
            connecting = old.connecting
        if not connecting and not accept_queue(old.port):
            return
        time.sleep(0.01)
    run.fail(f"relay {old.generation} still had connections to accept 10 s after the switch")


def handover(run: Run, rng: random.Random) -> None:
    old = run.current
    new = RelayProcess(run.args, old.generation + 1, run.workdir)
    with run.lock:
        run.relays.append(new)  # new cases go to the successor from now on
    settled(run, old)
    squeeze = rng.randint(0, 6) if rng.random() < 0.7 else -1  # a pair needs 2 to 6 (its closing frees its own)
    old.squeezed = squeeze >= 0
    old.say(f"handover {new.inbox} {squeeze} {rng.randrange(1 << 30)}")
    handed = old.expect("handed", 90)
    drained = old.expect("drained", 120)
    print(f"[driver] hand-over {old.generation} -> {new.generation} (squeeze {squeeze}): {json.dumps(handed)}",
          file=sys.stderr, flush=True)
    if drained["cut"] or stray(old, drained):
        run.fail(f"relay {old.generation} after its hand-over and drain: {json.dumps(drained)} "
                 "(no pair may be cut, no TCP socket or pipe left)")
    old.say("exit")
    old.proc.wait(60)
    if old.proc.returncode != 0:
        run.fail(f"relay {old.generation} exited with {old.proc.returncode}: {old.stderr_tail()}")


def quiet_point(run: Run, rng: random.Random) -> None:
    relay = run.current
    deadline = time.monotonic() + 10
    relay.say("probe")
    seen = relay.expect("probe", 30)
    while stray(relay, seen) and time.monotonic() < deadline:
        time.sleep(0.2)  # the last pairs close once both ends are closed
        relay.say("probe")
        seen = relay.expect("probe", 30)
    seen["served"] = relay.served
    relay.quiet.append(seen)
    first = relay.quiet[0]
    if stray(relay, seen):
        run.fail(f"relay {relay.generation} at a quiet point: {json.dumps(seen)} (no pair, TCP socket or pipe may stay)")
    if seen["fds"] != first["fds"]:
        run.fail(f"relay {relay.generation}: {seen['fds']} fds at a quiet point, {first['fds']} at its first")
    if seen["rss"] - first["rss"] > RSS_BOUND:
        run.fail(f"relay {relay.generation}: RSS grew by {(seen['rss'] - first['rss']) >> 20} MiB since its first quiet point")
    cases = seen["served"] - first["served"]
    if first["blocks"] and seen["blocks"] - first["blocks"] > BLOCKS_FLOOR + BLOCKS_PER_CASE * cases:
        run.fail(f"relay {relay.generation}: Python's allocated blocks grew by {seen['blocks'] - first['blocks']} "
                 f"over {cases} cases")
    if "garbage-adopt" in run.args.conditions:
        relay.say(f"garbage 8 {rng.randrange(1 << 30)}")
        report = relay.expect("garbage", 30)
        if report["leaked"]:
            run.fail(f"relay {relay.generation}: adopt() of bad states left fds open: {report}")


def case_ids(args: argparse.Namespace) -> list[int] | None:
    return [int(x) for x in args.cases.split(",")] if args.cases else None


def drive(run: Run) -> None:
    args = run.args
    rng = random.Random(args.seed)
    backends = Backends(run.cases)
    run.relays.append(RelayProcess(args, 1, run.workdir))
    print(f"[driver] relay: {run.current.ready['kind']}, seed {args.seed}, scenarios {','.join(args.scenarios)}, "
          f"conditions {','.join(args.conditions)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    wanted = case_ids(args)
    next_id = 0
    quiet_point(run, rng)
    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            while (time.monotonic() - started < args.seconds and next_id < args.count
                   and (wanted is None or next_id < max(wanted) + 1)):
                round_size = args.concurrency * ROUND_CASES
                hand_at = round_size // 2 if "handover" in args.conditions and rng.random() < 0.5 else -1
                futures = []
                for i in range(round_size):
                    if next_id >= args.count or time.monotonic() - started >= args.seconds:
                        break
                    case_id, next_id = next_id, next_id + 1
                    if wanted is not None and case_id not in wanted:
                        continue
                    case = make_case(args.seed, case_id, args.scenarios, DIAL_TIMEOUTS, args.services)
                    run.cases[case.id] = case
                    futures.append(pool.submit(run_case, run, backends, case))
                    if i == hand_at:
                        time.sleep(0.3)  # pairs in every stage when it comes
                        handover(run, rng)
                for future in futures:
                    future.result()
                if run.current.proc.poll() is not None:
                    raise RelayGone(f"relay {run.current.generation} died ({run.current.proc.returncode}): "
                                    f"{run.current.stderr_tail()}")
                quiet_point(run, rng)
                done = len(run.results)
                print(f"[driver] {done} cases in {time.monotonic() - started:.0f} s, {len(run.failures)} failures",
                      file=sys.stderr, flush=True)
        last = run.current
        last.say("exit")
        report = last.expect("exit", 60)
        last.proc.wait(60)
        if report["cut"] or stray(last, report) or last.proc.returncode != 0:
            run.fail(f"relay {last.generation} at exit: {json.dumps(report)}, exit code {last.proc.returncode}")
    except RelayGone as err:
        run.fail(str(err))
    finally:
        for relay in run.relays:
            relay.stop()
            if relay.complaints():
                run.fail(f"relay {relay.generation} printed: {relay.complaints()}")
        backends.close()


def summary(run: Run) -> dict[str, Any]:
    per: dict[str, dict[str, int]] = {}
    for result in run.results:
        row = per.setdefault(result.case.scenario, {"cases": 0, "failed": 0, "refused": 0, "ms": 0})
        row["cases"] += 1
        row["ms"] += int((result.client.ended_at - result.connected_at) * 1000)
        row["failed"] += result.failure is not None
        row["refused"] += result.case.kind in ("full", "urgent") and not result.seen and result.failure is None
    for row in per.values():
        row["ms"] //= row["cases"]  # mean duration
    return {"seed": run.args.seed, "relay": run.args.relay, "loop": run.args.loop, "cases": len(run.results),
            "failures": len(run.failures), "relays": len(run.relays), "scenarios": per}


def replay_command(args: argparse.Namespace, failed: list[int]) -> str:
    parts = ["python -m tests.hardening.driver", "--relay", args.relay, "--loop", args.loop, "--seed", str(args.seed),
             "--scenarios", ",".join(args.scenarios + args.conditions)]
    if args.services:
        parts += ["--services", ",".join(args.services)]
    if failed:
        parts += ["--cases", ",".join(str(i) for i in failed[:20])]
    return " ".join(parts)


def run_inside(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    subprocess.run(["nft", "-f", "-"], input=NFT_RULES, text=True, check=True, timeout=30)
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-hardening-"))
    run = Run(args, workdir)
    try:
        drive(run)
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    report = summary(run)
    print(json.dumps(report), flush=True)
    failed = sorted(r.case.id for r in run.results if r.failure)
    if run.failures:
        print(f"[driver] {len(run.failures)} failures; replay: {replay_command(args, failed)}", file=sys.stderr)
        return 1
    return 0


def run_in_namespace(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("the driver needs root (a network namespace of its own, nftables in it)", file=sys.stderr)
        return 2
    name = f"pyproxy-hardening-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        timeout = args.seconds + 600
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.hardening.driver",
                               "--inside", *argv], cwd=ROOT, timeout=timeout).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


def parse(argv: list[str]) -> argparse.Namespace:
    names = [*SCENARIOS, *CONDITIONS]
    parser = argparse.ArgumentParser(prog="python -m tests.hardening.driver", description=__doc__.split("\n")[0])
    parser.add_argument("--relay", choices=["engine", "twin"], default="engine")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop starting cases after this long")
    parser.add_argument("--count", type=int, default=1_000_000, help="at most this many cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--scenarios", default="", help=f"only these (comma-separated) of: {', '.join(names)}")
    parser.add_argument("--exclude", default="", help="all but these")
    parser.add_argument("--cases", default="", help="only these case numbers (as a failure names them)")
    parser.add_argument("--services", default="", help=f"live Services to use only (of {', '.join(LIVE)})")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [n for n in args.scenarios.split(",") if n] or names
    excluded = {n for n in args.exclude.split(",") if n}
    unknown = (set(chosen) | excluded) - set(names)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.scenarios = tuple(n for n in chosen if n in SCENARIOS and n not in excluded)
    args.conditions = tuple(n for n in chosen if n in CONDITIONS and n not in excluded)
    args.services = tuple(n for n in args.services.split(",") if n)
    if set(args.services) - set(LIVE):
        parser.error(f"unknown services: {args.services}")
    if not args.scenarios:
        parser.error("no scenario left to run")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.inside:
        return run_inside(args)
    return run_in_namespace(args, argv)


if __name__ == "__main__":
    sys.exit(main())
