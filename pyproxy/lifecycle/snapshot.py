"""The state snapshot on disk: what a process started after a crash restores.

Theory of operation:
- Every `lifecycle.snapshotInterval` (default 2 s), if anything changed since the last
  write (a sync, or any affinity hit, miss or eviction), the running process writes
  `<stateDir>/state.json` (worker i: `state-<i>.json`): the sync state and the affinity pins
  of `state.py`, with the wall-clock time of writing. The write is atomic: a temporary file
  in the same directory, flushed, then renamed over the old one, so a reader sees a whole
  old snapshot or a whole new one, never a torn one, even after `kill -9` mid-write.
- A process starting without a predecessor to hand over from reads it once. One older than
  `lifecycle.snapshotMaxAge` (1 h) is not restored: a crashed process's successor finds one
  a few seconds old; an old one would program Services long gone. A restored snapshot serves
  until the first complete list from the API server replaces it (if the API server stays
  away, as kube-proxy keeps its rules: the last good state goes on serving). A snapshot
  that is not JSON, not ours (`format`), of another hand-over protocol, of another node,
  or whose parts do not decode is ignored with one log line saying which and why; the
  process then starts as if there were none. The age the file lay on disk is added to
  every pin's age, so expiry is exactly where it would have been.
- What the state is, is read on the loop (consistently, between two callbacks); a part
  given as `Deferred` (the store: `state.StoreEncoder`, incremental) is turned into JSON in
  the writer's thread, with the rest of the encoding and the file I/O, so that nothing on
  the loop grows with the store beyond copying references.
- The file is the JSON document gzipped, as a series of gzip members (RFC 1952 allows any
  number, and their concatenation decompresses to the concatenation of their contents):
  the store's encoder keeps each object's member, compressed once when the object is new
  (at 10,000 Services 5 MB kept and written every interval instead of 18.5 MB of JSON). A
  plain JSON snapshot (an older release's) is read as well; decompression stops at
  MAX_SIZE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyproxy.lifecycle.handover import spoken_protocol

log = logging.getLogger("pyproxy.lifecycle")

FORMAT = "pyproxy-state"
MAX_SIZE = 256 << 20
GZIP_MAGIC = b"\x1f\x8b"


def member(data: bytes) -> bytes:
    """`data` as one gzip member (level 1: the snapshot is rewritten often, read rarely)."""
    return zlib.compress(data, 1, wbits=31)


def gunzip(data: bytes, limit: int = MAX_SIZE) -> bytes:
    """The concatenated contents of a series of gzip members; ValueError past `limit` bytes
    or on anything that is not whole gzip members."""
    out = bytearray()
    for _ in range(len(data)):  # bounded: every member is at least 18 bytes long
        if not data:
            return bytes(out)
        unzip = zlib.decompressobj(wbits=31)
        try:
            out += unzip.decompress(data, limit + 1 - len(out))
        except zlib.error as err:
            raise ValueError(f"not gzip: {err}") from None
        if len(out) > limit or unzip.unconsumed_tail:
            raise ValueError(f"larger than {limit} bytes once decompressed")
        if not unzip.eof:
            raise ValueError("a gzip member is cut short")
        data = unzip.unused_data
    return bytes(out)


def snapshot_path(state_dir: str, index: int = 0) -> Path:
    return Path(state_dir) / ("state.json" if index == 0 else f"state-{index}.json")


def write_atomically(path: Path, data: bytes | Iterable[bytes]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.writelines([data] if isinstance(data, bytes) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class Deferred:
    """A part of a snapshot's body whose JSON `produce()` makes, in the writer's thread, as
    gzip members (`member`) written one after the other (a large store is never copied into
    one buffer)."""

    produce: Callable[[], Iterable[bytes]]


def snapshot_chunks(node: str, body: Mapping[str, Any], wall: float) -> list[bytes]:
    """The snapshot file as gzip members (see the module doc)."""
    plain = {k: v for k, v in body.items() if not isinstance(v, Deferred)}
    head = json.dumps({"format": FORMAT, "protocol": spoken_protocol(), "node": node, "written": wall, **plain},
                      separators=(",", ":")).encode()
    deferred = [(k, v) for k, v in body.items() if isinstance(v, Deferred)]
    if not deferred:
        return [member(head)]
    chunks = [member(head[:-1])]
    for key, part in deferred:
        chunks.append(member(b"," + json.dumps(key).encode() + b":"))
        chunks.extend(part.produce())
    chunks.append(member(b"}"))
    return chunks


def encode_snapshot(node: str, body: Mapping[str, Any], wall: float) -> bytes:
    return b"".join(snapshot_chunks(node, body, wall))


def encode_and_write(path: Path, node: str, body: Mapping[str, Any], wall: float) -> None:
    write_atomically(path, snapshot_chunks(node, body, wall))


def decode_snapshot(data: bytes, node: str, path: str) -> dict[str, Any] | None:
    """The snapshot's body (with `age`: seconds since it was written), or None with a log line."""
    try:
        doc = json.loads(gunzip(data) if data.startswith(GZIP_MAGIC) else data)
    except ValueError as err:
        log.error("ignoring the state snapshot %s: not valid JSON (%s); starting without it", path, err)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        log.error("ignoring the state snapshot %s: not a pyproxy state snapshot; starting without it", path)
        return None
    if doc.get("protocol") != spoken_protocol():
        log.error("ignoring the state snapshot %s: written by hand-over protocol %r, this release speaks %d; "
                  "starting without it", path, doc.get("protocol"), spoken_protocol())
        return None
    if doc.get("node") != node:
        log.error("ignoring the state snapshot %s: it is node %r's, this is %r; starting without it",
                  path, doc.get("node"), node)
        return None
    written = doc.get("written")
    if isinstance(written, bool) or not isinstance(written, (int, float)):
        log.error("ignoring the state snapshot %s: no write time; starting without it", path)
        return None
    doc["age"] = max(0.0, time.time() - float(written))
    return doc


def read_snapshot(path: Path, node: str, max_age: float = 0.0) -> dict[str, Any] | None:
    """The snapshot at `path` (None, with a log line saying why, when it cannot be used:
    including one older than `max_age` seconds, unless that is 0)."""
    doc = _read_snapshot(path, node)
    if doc is not None and max_age > 0 and doc["age"] > max_age:
        log.error("ignoring the state snapshot %s: written %.0fs ago, more than lifecycle.snapshotMaxAge (%.0fs); "
                  "starting without it", path, doc["age"], max_age)
        return None
    return doc


def _read_snapshot(path: Path, node: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.error("ignoring the state snapshot %s: %s; starting without it", path, err)
        return None
    if len(data) > MAX_SIZE:
        log.error("ignoring the state snapshot %s: larger than %d bytes; starting without it", path, MAX_SIZE)
        return None
    return decode_snapshot(data, node, str(path))


class SnapshotWriter:
    """Writes the snapshot whenever `changed()` says so, at most every `interval` seconds."""

    def __init__(self, path: Path, node: str, body: Callable[[], dict[str, Any]],
                 generation: Callable[[], object], interval: float) -> None:
        self.path = path
        self.node = node
        self.body = body
        self.generation = generation
        self.interval = interval
        self._written: object = None
        self._failed = False

    async def write_now(self) -> None:
        generation = self.generation()
        if generation == self._written:
            return
        body = self.body()  # on the loop: a consistent view; the encoding and I/O in a thread
        try:
            await asyncio.to_thread(encode_and_write, self.path, self.node, body, time.time())
        except OSError as err:
            if not self._failed:
                log.error("cannot write the state snapshot %s: %s (retrying every %.0fs)", self.path, err, self.interval)
            self._failed = True
            return
        if self._failed:
            log.info("state snapshot %s written again", self.path)
        self._failed = False
        self._written = generation

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.write_now()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass
