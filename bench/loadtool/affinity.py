"""Affinity: which backend answers each client (source address), and what that says.

Rules kept here:
- A client is a source address; it makes `per_client` connections one after another, each
  reading the backend's name (`N` mode). Clients run concurrently, `conns` at a time.
- Sticky client: all its successful connections reached one backend. Share = sticky / clients
  with at least one success.
- After a backend is removed (phase 2), a client moved *needlessly* if it was sticky in phase 1
  on a backend that still exists and phase 2 did not keep it on exactly that backend.
- The removed backend is the one named, else inferred: the only backend seen in phase 1 and
  not in phase 2 (none if that is ambiguous).
- `analyze` and `infer_removed` are pure; `phase` is the only I/O.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bench.loadtool import protocol as proto
from bench.loadtool.client import connect, recv_until_eof
from bench.loadtool.modes import Context, now

Observations = dict[str, list[str]]


async def _client(ctx: Context, src: str, gate: asyncio.Semaphore, out: Observations) -> None:
    names: list[str] = []
    buf = memoryview(bytearray(4096))
    async with gate:
        for _ in range(ctx.spec.per_client):
            if now() >= ctx.stop_at:
                break
            try:
                async with asyncio.timeout(ctx.spec.timeout):
                    sock = await connect(ctx.spec.target, src or None)
                    try:
                        ctx.tally.conns_opened += 1
                        await asyncio.get_running_loop().sock_sendall(sock, proto.name().pack())
                        size = await recv_until_eof(sock, buf, limit=4000)
                    finally:
                        sock.close()
                names.append(bytes(buf[:size]).decode(errors="replace").strip())
                ctx.tally.ops += 1
            except (OSError, TimeoutError) as exc:
                ctx.tally.error(exc)
    out[src or "default"] = names


async def phase(ctx: Context) -> Observations:
    out: Observations = {}
    gate = asyncio.Semaphore(max(1, ctx.my_conns))
    await asyncio.gather(*(_client(ctx, src, gate, out) for src in (ctx.sources or ("",))))
    ctx.tally.finish(now())
    return out


def merge_observations(parts: Sequence[Mapping[str, Sequence[str]]]) -> Observations:
    out: Observations = {}
    for part in parts:
        for client, names in part.items():
            out.setdefault(client, []).extend(names)
    return out


def infer_removed(before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]) -> str | None:
    seen_before = {n for names in before.values() for n in names}
    seen_after = {n for names in after.values() for n in names}
    gone = seen_before - seen_after
    return gone.pop() if len(gone) == 1 else None


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def analyze(
    before: Mapping[str, Sequence[str]],
    after: Mapping[str, Sequence[str]] | None = None,
    removed: str | None = None,
) -> dict[str, Any]:
    answered = {c: names for c, names in before.items() if names}
    sticky = {c: names[0] for c, names in answered.items() if len(set(names)) == 1}
    report: dict[str, Any] = {
        "clients": len(before),
        "clients_answered": len(answered),
        "sticky": len(sticky),
        "sticky_share": _share(len(sticky), len(answered)),
        "clients_per_backend": dict(sorted(Counter(n[0] for n in answered.values()).items())),
    }
    if after is None:
        return report
    if not removed:
        removed = infer_removed(before, after)
    eligible = moved = displaced = 0
    for client, backend in sticky.items():
        names = after.get(client, [])
        if not names:
            continue
        if backend == removed:
            displaced += 1
            continue
        eligible += 1
        if set(names) != {backend}:
            moved += 1
    report.update({
        "removed": removed,
        "after_sticky_share": analyze(after)["sticky_share"],
        "eligible": eligible,
        "moved_needlessly": moved,
        "moved_needlessly_share": _share(moved, eligible),
        "displaced": displaced,
    })
    return report
