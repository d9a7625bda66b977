"""The driver's connections: what each scenario does at both ends, and what it must deliver.

Pure: a case is made from (run seed, case number) alone (`make_case`), so a run replays
with its seed and one case can be run again by its number. Both ends run scripts of
actor.py's steps: the client connects through the relay to a Service address, sends a
16-byte header naming the case, then its script; the backend reads the header and runs its
own. Every byte is random (seeded) and compared with what was sent.

What a case must deliver (`judge`):
- `full`: both ends get exactly the bytes the other sent, in order, and each stream ends
  with a clean EOF (no reset), before the deadline.
- `urgent`: the same, except that each urgent byte (MSG_OOB) may arrive in band, in its
  place, or not at all: every other byte arrives in order, and the ends are clean EOFs.
- `prefix`: one end resets or closes on purpose mid-stream, so bytes may be lost: each
  end got a prefix of what the other sent (nothing out of order, nothing made up), every
  stream ended (EOF or reset) before the deadline (an end left waiting is a stuck pair),
  and the backend (when it saw the case) ended too.
- `refused`: the Service has no reachable endpoint: the backend never sees the case, the
  client gets no byte and a reset or EOF within `refuse_within` seconds.
- `dialing`: the client resets while the relay still dials: it got no byte and the backend
  never saw the case (what the relay must not leak is checked after the run).
A `full` or `urgent` case may instead end as a refusal (no byte, never seen by the
backend, reset or EOF) only where a refusal is the relay's rule: on a relay whose fd limit
the driver squeezed for a hand-over (a dial that finds no fd is refused: see driver.py).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.hardening.actor import Outcome, Step

MAGIC = 0x7079707278686172
HEADER = struct.Struct("!QQ")
SERVICES = {"plain": "127.0.1.1", "sticky": "127.0.1.2", "flaky": "127.0.1.3", "blackhole": "127.0.1.4",
            "dead": "127.0.1.5"}
BACKENDS = {"a": "127.0.2.1", "b": "127.0.2.2", "refused": "127.0.2.3", "hole1": "127.0.2.4",
            "hole2": "127.0.2.5", "lossy": "127.0.2.6"}
SERVING = ("a", "b", "lossy")  # the backends that listen (lossy drops half of the SYNs: driver.py)
ENDPOINTS = {"plain": ("a", "b"), "sticky": ("a", "b"), "flaky": ("a", "refused", "hole1", "lossy"),
             "blackhole": ("hole1", "hole2"), "dead": ("refused",)}
BACKEND_PORT = 9000
LIVE = ("plain", "sticky", "flaky")


@dataclass
class Case:
    id: int
    scenario: str
    service: str
    kind: str  # full | urgent | prefix | refused | dialing
    client: list[Step]
    backend: list[Step]
    up: bytes = b""  # what the backend must get (full), or may get a prefix of
    down: bytes = b""  # what the client must get
    up_alternatives: tuple[bytes, ...] = ()  # urgent: what the backend may get instead
    down_alternatives: tuple[bytes, ...] = ()
    client_read: tuple[int, float] = (1 << 16, 0.0)  # read size, pause after each read
    backend_read: tuple[int, float] = (1 << 16, 0.0)
    refuse_within: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)


def header(case_id: int) -> bytes:
    return HEADER.pack(MAGIC, case_id)


def size(rng: random.Random, big: bool = False) -> int:
    r = rng.random()
    if big:
        return rng.randint(100_000, 1_500_000) if r < 0.9 else rng.randint(1_500_000, 4_000_000)
    if r < 0.08:
        return 0
    if r < 0.45:
        return rng.randint(1, 2_000)
    if r < 0.8:
        return rng.randint(2_000, 100_000)
    if r < 0.97:
        return rng.randint(100_000, 400_000)
    return rng.randint(400_000, 3_000_000)


def sends(rng: random.Random, data: bytes) -> list[Step]:
    """`data` in a few random pieces, with a short pause now and then."""
    steps: list[Step] = []
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            steps.append(("send", data[start:cut]))
            if rng.random() < 0.3:
                steps.append(("pause", rng.uniform(0.001, 0.03)))
        start = cut
    return steps


def _slow(rng: random.Random, p: float) -> tuple[int, float]:
    """A slow reader's read size and pause (with a small receive buffer: actor.py), or a fast one."""
    return (rng.choice((4096, 16384)), rng.uniform(0.0002, 0.001)) if rng.random() < p else (1 << 16, 0.0)


def _echo(c: Case, rng: random.Random) -> None:
    c.up = c.down = rng.randbytes(size(rng))
    c.client += [*sends(rng, c.up), ("shut", None)]
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]
    c.client_read = _slow(rng, 0.2)


def _reply_after_eof(c: Case, rng: random.Random) -> None:
    c.up, c.down = rng.randbytes(size(rng)), rng.randbytes(size(rng))
    c.client += [*sends(rng, c.up), ("shut", None)]
    c.backend += [("until_eof", None), *sends(rng, c.down), ("shut", None)]


def _server_first(c: Case, rng: random.Random) -> None:
    c.up, c.down = rng.randbytes(size(rng)), rng.randbytes(size(rng))
    c.backend += [*sends(rng, c.down), ("shut", None), ("until_eof", None)]
    c.client += [("until_eof", None), *sends(rng, c.up), ("shut", None)]


def _turns(c: Case, rng: random.Random) -> None:
    parts = [rng.randbytes(rng.choice((1, 100, 5_000, 70_000, 300_000))) for _ in range(rng.randint(2, 6))]
    total = 0
    for part in parts:
        total += len(part)
        c.client += [("send", part), ("until_got", total)]
    c.client.append(("shut", None))
    c.up = c.down = b"".join(parts)
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]


def _slow_reader(c: Case, rng: random.Random) -> None:
    c.down = rng.randbytes(rng.randint(50_000, 600_000))
    c.backend += [("send", c.down), ("shut", None), ("until_eof", None)]
    c.client += [("until_eof", None), ("shut", None)]
    c.client_read = _slow(rng, 1.0)


def _slow_backend(c: Case, rng: random.Random) -> None:
    c.up, c.down = rng.randbytes(rng.randint(50_000, 600_000)), rng.randbytes(rng.randint(0, 3000))
    c.client += [("send", c.up), ("shut", None)]
    c.backend += [("until_eof", None), ("send", c.down), ("shut", None)]
    c.backend_read = _slow(rng, 1.0)


def _paced(rng: random.Random, data: bytes) -> list[Step]:
    """`data` in pieces of up to 64 KiB over about 0.3 to 2 s: a stream still open when a
    hand-over comes."""
    steps: list[Step] = []
    pieces = max(1, len(data) // 65536)
    pause = rng.uniform(0.3, 2.0) / pieces
    for start in range(0, len(data), 65536):
        steps += [("send", data[start:start + 65536]), ("pause", pause)]
    return steps


def _paced_echo(c: Case, rng: random.Random) -> None:
    c.up = c.down = rng.randbytes(rng.randint(10_000, 2_000_000))
    c.client += [*_paced(rng, c.up), ("shut", None)]
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]


def _paced_download(c: Case, rng: random.Random) -> None:
    """The client half-closes at once: the pair streams towards it half-closed."""
    c.down = rng.randbytes(rng.randint(10_000, 2_000_000))
    c.client += [("shut", None), ("until_eof", None)]
    c.backend += [("until_eof", None), *_paced(rng, c.down), ("shut", None)]


def _urgent_parts(rng: random.Random) -> tuple[bytes, bytes, bytes]:
    big = rng.random() < 0.4  # past splice_after: the spliced path meets the mark
    first = rng.randbytes(rng.randint(100_000, 1_200_000) if big else rng.randint(0, 5_000))
    rest = rng.randbytes(rng.randint(100_000, 1_200_000) if big and rng.random() < 0.5 else rng.randint(0, 5_000))
    return first, bytes([rng.randrange(256)]), rest


def _urgent_up(c: Case, rng: random.Random) -> None:
    first, mark, rest = _urgent_parts(rng)
    c.client += [("send", first), ("urgent", mark), ("send", rest), ("shut", None)]
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]
    c.up = c.down = first + rest
    c.up_alternatives = c.down_alternatives = (first + mark + rest,)


def _urgent_down(c: Case, rng: random.Random) -> None:
    first, mark, rest = _urgent_parts(rng)
    c.backend += [("send", first), ("urgent", mark), ("send", rest), ("shut", None), ("until_eof", None)]
    c.client += [("until_eof", None), ("shut", None)]
    c.down = first + rest
    c.down_alternatives = (first + mark + rest,)


def _client_reset_open(c: Case, rng: random.Random) -> None:
    c.up = c.down = rng.randbytes(rng.randint(1, 200_000))
    c.client += [("send", c.up), ("until_got", rng.randint(1, len(c.up))), ("reset", None)]
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]


def _client_reset_half_closed(c: Case, rng: random.Random) -> None:
    c.up, c.down = rng.randbytes(size(rng)), rng.randbytes(rng.randint(1, 1_500_000))
    c.client += [*sends(rng, c.up), ("shut", None), ("until_got", rng.randint(1, len(c.down))), ("reset", None)]
    c.backend += [("until_eof", None), ("send", c.down), ("shut", None)]


def _client_reset_spliced(c: Case, rng: random.Random) -> None:
    c.up = c.down = rng.randbytes(rng.randint(300_000, 3_000_000))
    c.client += [("send", c.up[: rng.randint(200_000, len(c.up))]), ("reset", None)]
    c.backend += [("echo", True), ("until_eof", None), ("shut", None)]


def _backend_reset_open(c: Case, rng: random.Random) -> None:
    c.up = rng.randbytes(size(rng))
    c.client += [*sends(rng, c.up), ("shut", None)]
    c.backend += [("pause", rng.uniform(0, 0.02)), ("reset", None)]


def _backend_reset_spliced(c: Case, rng: random.Random) -> None:
    c.up = c.down = rng.randbytes(rng.randint(300_000, 3_000_000))
    c.client += [("send", c.up), ("shut", None)]
    c.backend += [("echo", True), ("until_got", rng.randint(100_000, len(c.up) - 1)), ("reset", None)]


def _backend_reset_half_closed(c: Case, rng: random.Random) -> None:
    c.up, c.down = rng.randbytes(size(rng)), rng.randbytes(rng.randint(1, 1_500_000))
    c.client += [*sends(rng, c.up), ("shut", None)]
    c.backend += [("until_eof", None), ("send", c.down[: rng.randint(0, len(c.down))]), ("reset", None)]


def _backend_close_unread(c: Case, rng: random.Random) -> None:
    c.up = rng.randbytes(rng.randint(200_000, 2_000_000))
    c.client += [("send", c.up), ("shut", None)]
    c.backend += [("until_got", rng.randint(0, 100_000)), ("close", None)]


def _client_reset_dialing(c: Case, rng: random.Random) -> None:
    c.client += [("send", rng.randbytes(rng.randint(0, 3000))), ("pause", rng.uniform(0.0, 0.9)), ("reset", None)]


def _dial_timeout(c: Case, rng: random.Random) -> None:
    c.client += [("send", rng.randbytes(rng.randint(0, 3000)))] + ([("shut", None)] if rng.random() < 0.5 else [])
    c.client.append(("until_eof", None))


def _dead(c: Case, rng: random.Random) -> None:
    c.client += [("send", rng.randbytes(rng.randint(0, 3000))), ("until_eof", None)]


Builder = Callable[[Case, random.Random], None]
# name: (kind, services it may use, builder)
SCENARIOS: dict[str, tuple[str, tuple[str, ...], Builder]] = {
    "echo": ("full", LIVE, _echo),
    "reply-after-eof": ("full", LIVE, _reply_after_eof),
    "server-first": ("full", LIVE, _server_first),
    "turns": ("full", LIVE, _turns),
    "slow-reader": ("full", LIVE, _slow_reader),
    "paced-echo": ("full", LIVE, _paced_echo),
    "paced-download": ("full", LIVE, _paced_download),
    "slow-backend": ("full", LIVE, _slow_backend),
    "urgent-up": ("urgent", LIVE, _urgent_up),
    "urgent-down": ("urgent", LIVE, _urgent_down),
    "client-reset-open": ("prefix", LIVE, _client_reset_open),
    "client-reset-half-closed": ("prefix", LIVE, _client_reset_half_closed),
    "client-reset-spliced": ("prefix", LIVE, _client_reset_spliced),
    "backend-reset-open": ("prefix", LIVE, _backend_reset_open),
    "backend-reset-spliced": ("prefix", LIVE, _backend_reset_spliced),
    "backend-reset-half-closed": ("prefix", LIVE, _backend_reset_half_closed),
    "backend-close-unread": ("prefix", LIVE, _backend_close_unread),
    "client-reset-dialing": ("dialing", ("blackhole",), _client_reset_dialing),
    "dial-timeout": ("refused", ("blackhole",), _dial_timeout),
    "dead-endpoint": ("refused", ("dead",), _dead),
}
# Not connections but conditions of the run (driver.py): hand-overs under a squeezed fd limit,
# adopt() fed bad states, the relay's event loop stalling now and then, SIGPIPE left at its
# default action in the engine's process (CPython ignores it; an engine must not need that).
CONDITIONS = ("handover", "garbage-adopt", "stall", "sigpipe")
WEIGHTS = {"echo": 4, "reply-after-eof": 2, "server-first": 2, "turns": 2, "dial-timeout": 0.5, "dead-endpoint": 0.5,
           "client-reset-dialing": 0.5}


def make_case(seed: int, case_id: int, scenarios: tuple[str, ...], dial_timeouts: tuple[float, ...],
              only_services: tuple[str, ...] = ()) -> Case:
    """Case `case_id` of the run with `seed`; `only_services` narrows the live Services a
    scenario may use (the draws stay the same, so case numbers keep their scenario)."""
    rng = random.Random(f"{seed}:{case_id}")
    weights = [WEIGHTS.get(name, 1.0) for name in scenarios]
    name = rng.choices(scenarios, weights)[0]
    kind, services, build = SCENARIOS[name]
    service = rng.choice(services)
    narrowed = [s for s in services if s in only_services]
    if narrowed and service not in narrowed:
        service = narrowed[case_id % len(narrowed)]
    case = Case(case_id, name, service, kind, [("send", header(case_id))], [])
    build(case, rng)
    if kind == "refused":  # every endpoint fails: one attempt per endpoint, each up to its timeout
        attempts = len(ENDPOINTS[case.service])
        case.refuse_within = sum(dial_timeouts[:attempts]) + 5.0
    return case


def _prefix_of(got: bytes, sent: bytes) -> bool:
    return sent[: len(got)] == got


def _describe(got: bytes, want: bytes) -> str:
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"{len(got)} bytes of {len(want)}, first difference at {same}"


def judge(case: Case, client: Outcome, backend: Outcome | None, refusal_allowed: bool) -> str | None:
    """None if the case delivered what its kind promises (see the header), else why not."""
    got_down, got_up = bytes(client.got), bytes(backend.got) if backend is not None else b""
    if client.timed_out:
        where = "never saw the case" if backend is None else f"got {_describe(got_up, case.up)}, ended by {backend.ending()}"
        return (f"client stuck: no end of stream before the deadline ({_describe(got_down, case.down)}; "
                f"the backend {where})")
    if backend is not None and backend.timed_out:
        return f"backend stuck: its stream never ended ({_describe(got_up, case.up)})"
    if case.kind in ("refused", "dialing"):
        if backend is not None:
            return "the backend saw a connection to a Service without a reachable endpoint"
        if got_down:
            return f"the client got {len(got_down)} bytes from nowhere"
        if case.kind == "refused" and client.ending() not in ("eof", "reset"):
            return f"the client was not refused: {client.ending()}"
        return None
    if backend is None and case.kind != "prefix":
        if refusal_allowed and not got_down and client.ending() in ("eof", "reset"):
            return None
        return f"the backend never saw the connection; the client got {len(got_down)} bytes, ended by {client.ending()}"
    if case.kind == "prefix":
        if backend is None and ("reset", None) not in case.client:
            return f"the backend never saw the connection; the client got {len(got_down)} bytes"
        if not _prefix_of(got_down, case.down):
            return f"client got bytes that were not sent: {_describe(got_down, case.down)}"
        if not _prefix_of(got_up, case.up):
            return f"backend got bytes that were not sent: {_describe(got_up, case.up)}"
        return None
    assert backend is not None
    for side, got, want, alternatives, outcome in (("client", got_down, case.down, case.down_alternatives, client),
                                                    ("backend", got_up, case.up, case.up_alternatives, backend)):
        if got != want and got not in alternatives:
            return f"{side} got the wrong bytes: {_describe(got, want)} (ended by {outcome.ending()})"
        if outcome.ending() != "eof":
            return f"{side} got every byte but its stream ended by {outcome.ending()}, not a clean EOF"
    return None
