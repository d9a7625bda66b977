"""The hand-over channel: framed messages with file descriptors over a unix stream socket.

Theory of operation:
- A `Message` is a kind (a short ASCII string), a JSON body (a mapping) and a tuple of
  file descriptors. On the wire one message is one frame, written with one `sendmsg`:

      4 bytes  magic b"PYHO"
      4 bytes  big-endian length N of what follows
      N bytes  kind (ASCII) + b"\\n" + body (UTF-8 JSON)

  and its descriptors ride along as SCM_RIGHTS ancillary data of that same `sendmsg`, so
  the kernel attaches them to the frame's first bytes. The reader collects every
  descriptor that arrives while it reads a frame and hands them out with that frame; a
  frame that arrives with descriptors it did not expect (or more than `MAX_FDS`) is an
  error, and every received descriptor is closed on any error.
- Ownership: `send` leaves the sender's descriptors open (the kernel duplicates them into
  the peer); every descriptor in a received message belongs to the receiver, which must
  wrap it (`socket.socket(fileno=fd)`) or close it (`close_fds`).
- Bounds: a frame is at most `MAX_FRAME` bytes and `MAX_FDS` descriptors (the kernel's
  SCM_MAX_FD is 253); every read and write has a deadline (`timeout`), so a peer that
  stops talking costs one timeout, never a hang.
- The channel is blocking and runs in a thread (`asyncio.to_thread`): the event loop of
  either process keeps serving while a hand-over is in flight.
- Errors are `ChannelError`, naming what went wrong (peer closed, bad magic, oversize,
  bad JSON, timeout); the caller logs them and falls back to draining.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"PYHO"
HEADER = struct.Struct("!4sI")
MAX_FRAME = 256 << 20  # bytes: a large store plus its affinity tables fits many times over
MAX_FDS = 250
KIND_LIMIT = 64


class ChannelError(RuntimeError):
    pass


@dataclass
class Message:
    """One hand-over message: `kind`, a JSON-able `body`, and descriptors (see ownership above)."""

    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    fds: tuple[int, ...] = ()


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode(message: Message) -> bytes:
    kind = message.kind.encode("ascii")
    if not kind or len(kind) > KIND_LIMIT or b"\n" in kind:
        raise ChannelError(f"message kind {message.kind!r} must be 1-{KIND_LIMIT} ASCII characters")
    payload = kind + b"\n" + json.dumps(message.body, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise ChannelError(f"message {message.kind!r} is {len(payload)} bytes, more than {MAX_FRAME}")
    if len(message.fds) > MAX_FDS:
        raise ChannelError(f"message {message.kind!r} carries {len(message.fds)} descriptors, more than {MAX_FDS}")
    return HEADER.pack(MAGIC, len(payload)) + payload


def decode(payload: bytes, fds: tuple[int, ...]) -> Message:
    kind, sep, body = payload.partition(b"\n")
    if not sep or not kind or len(kind) > KIND_LIMIT:
        raise ChannelError("frame without a message kind")
    try:
        parsed = json.loads(body)
        text = kind.decode("ascii")
    except (ValueError, UnicodeDecodeError) as err:
        raise ChannelError(f"message {kind[:KIND_LIMIT]!r}: body is not JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ChannelError(f"message {text!r}: body must be a JSON object")
    return Message(text, parsed, fds)


class Channel:
    """One end of a hand-over connection (blocking; call from a thread)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout)

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, message: Message) -> None:
        frame = encode(message)
        try:
            if message.fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", message.fds).tobytes())]
                sent = self.sock.sendmsg([frame], rights)
            else:
                sent = self.sock.send(frame)
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        except (OSError, socket.timeout) as err:
            raise ChannelError(f"sending {message.kind!r}: {err or type(err).__name__}") from None

    def send_all(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(message)

    def receive(self, expect_fds: bool = True) -> Message:
        fds: list[int] = []
        try:
            head = self._read(HEADER.size, fds)
            magic, length = HEADER.unpack(head)
            if magic != MAGIC:
                raise ChannelError(f"not a hand-over frame (magic {magic!r})")
            if length > MAX_FRAME:
                raise ChannelError(f"frame of {length} bytes, more than {MAX_FRAME}")
            payload = self._read(length, fds)
            if fds and not expect_fds:
                raise ChannelError(f"{len(fds)} unexpected descriptors")
            return decode(payload, tuple(fds))
        except BaseException:
            close_fds(fds)
            raise

    def _read(self, size: int, fds: list[int]) -> bytes:
        chunks: list[bytes] = []
        left = size
        space = socket.CMSG_SPACE(MAX_FDS * 4)
        while left:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(min(left, 1 << 20), space)
            except socket.timeout:
                raise ChannelError("timed out waiting for the peer") from None
            except OSError as err:
                raise ChannelError(f"receiving: {err}") from None
            for level, kind, blob in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[: len(blob) - len(blob) % 4])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ChannelError("descriptors truncated (more than the frame may carry)")
            if len(fds) > MAX_FDS:
                raise ChannelError(f"more than {MAX_FDS} descriptors in one frame")
            if not data:
                raise ChannelError("the peer closed the channel")
            chunks.append(data)
            left -= len(data)
        return b"".join(chunks)


def body_of(message: Message, kind: str) -> Mapping[str, Any]:
    """The body of `message`, which must be of `kind` (else a ChannelError naming both)."""
    if message.kind != kind:
        close_fds(message.fds)
        detail = f": {message.body.get('reason')}" if message.kind == "refuse" else ""
        raise ChannelError(f"expected {kind!r}, got {message.kind!r}{detail}")
    return message.body
