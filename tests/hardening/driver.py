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
import queue
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
from typing import IO, Any

from tests.hardening.actor import Actor, Outcome
from tests.hardening.scenarios import (
    BACKEND_PORT, BACKENDS, CONDITIONS, HEADER, LIVE, MAGIC, SCENARIOS, SERVICES, SERVING, Case, judge, make_case,
)

ROOT = Path(__file__).resolve().parents[2]
DIAL_TIMEOUTS = (1.0, 0.5, 1.0, 2.0)  # the first equals TCP's initial RTO: a lost SYN's retry meets it
CASE_DEADLINE = 30.0
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


# ---- the backends ----

class Backends:
    """Listeners at the serving backends; each connection names its case in its header."""

    def __init__(self, cases: dict[int, Case]) -> None:
        self.cases = cases
        self.seen: dict[int, Outcome | None] = {}  # None while the backend end still runs
        self.lock = threading.Lock()
        self.listeners = []
        for name in SERVING:
            sock = socket.create_server((BACKENDS[name], BACKEND_PORT), backlog=1024)
            self.listeners.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CASE_DEADLINE)
        raw = b""
        try:
            while len(raw) < HEADER.size:
                chunk = conn.recv(HEADER.size - len(raw))
                if not chunk:
                    break
                raw += chunk
        except OSError:
            pass
        case = None
        if len(raw) == HEADER.size:
            magic, case_id = HEADER.unpack(raw)
            case = self.cases.get(case_id) if magic == MAGIC else None
        if case is None:  # a stray connection, or its client reset before the header came whole
            conn.close()
            return
        with self.lock:
            self.seen[case.id] = None
        size, pause = case.backend_read
        outcome = Actor(conn, list(case.backend), time.monotonic() + CASE_DEADLINE, size, pause).run()
        with self.lock:
            self.seen[case.id] = outcome

    def outcome(self, case_id: int, wait: float) -> tuple[bool, Outcome | None]:
        """(seen, its outcome once the backend end finished, waiting up to `wait`)."""
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                seen = case_id in self.seen
                outcome = self.seen.get(case_id)
            if not seen or outcome is not None or time.monotonic() >= deadline:
                return seen, outcome
            time.sleep(0.01)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()


# ---- the relay processes ----

class RelayProcess:
    def __init__(self, args: argparse.Namespace, generation: int, workdir: Path) -> None:
        self.generation = generation
        self.port = 7000 + generation
        self.inbox = str(workdir / f"inbox{generation}.sock")
        self.lines: queue.Queue[str] = queue.Queue()
        self.connecting = 0  # cases that chose this relay and have not connected yet
        self.squeezed = False
        self.quiet: list[dict[str, Any]] = []
        self.served = 0
        argv = [sys.executable, "-m", "tests.hardening.peer", "--relay", args.relay, "--loop", args.loop,
                "--port", str(self.port), "--inbox", self.inbox,
                "--dial-timeouts", ",".join(str(t) for t in DIAL_TIMEOUTS)]
        if "stall" in args.conditions:
            argv += ["--stall", str(args.seed * 1000 + generation)]
        if "sigpipe" in args.conditions and args.relay == "engine":
            argv.append("--sigpipe-default")
        env = dict(os.environ, PYPROXY_LEAK_CHECK="1")
        if env.get("PYPROXY_SANITIZED") == "1":  # freed memory held for use-after-free checks: bounded
            env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=32"
        self.stderr_path = workdir / f"relay{generation}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.ready = self.expect("ready", 60)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == "":
                self.lines.put("")
                break
            name, _, body = line.partition(" ")
            if name == tag:
                return dict(json.loads(body))
        raise RelayGone(f"relay {self.generation}: no '{tag}' answer (exit code {self.proc.poll()}); "
                        f"stderr: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def complaints(self) -> str:
        """What the relay printed that only a bug prints: a traceback, an exception the
        engine could not raise (PyErr_WriteUnraisable), a sanitizer's line."""
        text = self.stderr_tail() if self.stderr_path.exists() else ""
        marks = ("Traceback", "Exception ignored", "ERROR:", "runtime error")
        return text if any(mark in text for mark in marks) else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class RelayGone(RuntimeError):
    pass


def stray(relay: RelayProcess, seen: dict[str, Any]) -> bool:
    """Pairs, TCP sockets (listeners aside) or pipes (past those the process had before any
    connection: the event loop's own) still open."""
    return bool(seen["pairs"] or seen["tcp"] or seen["pipes"] > relay.ready["pipes"])


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


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of this namespace's listener on `port`."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return 0


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
