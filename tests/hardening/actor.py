"""One end of a driver connection: a script of steps run on a non-blocking socket.

Rules kept here:
- An actor always reads what arrives (unless it is a slow reader: `read_chunk` bytes at a
  time with `read_pause` between reads), into `got`; in echo mode what it reads is also
  queued to be written back. Steps run in order, each once the bytes queued before it are
  written: `send`, `urgent` (one byte with MSG_OOB), `pause`, `shut` (SHUT_WR), `reset`
  (SO_LINGER 0 and close: the peer gets a reset), `close` (a plain close), `until_got N`,
  `until_eof`, `echo on|off`.
- After the last step the actor reads until the peer's EOF or reset, then closes.
- Once a send fails or the peer resets, nothing more goes out: the bytes still queued and
  those of later `send` steps are dropped, and the steps run on (else they would wait for
  a write that can never happen, and the actor would hang to its deadline).
- Bounded: every actor has a deadline; past it the socket is reset and `timed_out` set.
- It records how the stream ended (`eof`, `reset`, the first send error), never raises
  for the peer's behaviour: judging is the scenarios' business (scenarios.py).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from dataclasses import dataclass, field

LINGER_RESET = struct.pack("ii", 1, 0)
Step = tuple[str, object]


@dataclass
class Outcome:
    got: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset: bool = False
    send_error: str = ""
    timed_out: bool = False
    steps_done: int = 0
    ended_at: float = 0.0

    def ending(self) -> str:
        return "timeout" if self.timed_out else "reset" if self.reset else "eof" if self.eof else "open"


class Actor:
    def __init__(self, sock: socket.socket, steps: list[Step], deadline: float,
                 read_chunk: int = 1 << 16, read_pause: float = 0.0, got: bytes = b"") -> None:
        self.sock, self.steps, self.deadline = sock, steps, deadline
        self.read_chunk, self.read_pause = read_chunk, read_pause
        self.out = bytearray()
        self.echo = False
        self.closed = False
        self.outcome = Outcome(got=bytearray(got))
        sock.setblocking(False)
        if read_pause:  # a slow reader: a small window, so the relay's writes towards it fill up
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)

    def run(self) -> Outcome:
        try:
            self._run()
        finally:
            if not self.closed:
                self._close(self.outcome.timed_out)
            self.outcome.ended_at = time.monotonic()
        return self.outcome

    def _run(self) -> None:
        index = 0
        wake = 0.0  # a pause step ends then
        while not self.closed:
            now = time.monotonic()
            if now >= self.deadline:
                self.outcome.timed_out = True
                return
            if index < len(self.steps) and not self.out and now >= wake:
                kind, arg = self.steps[index]
                done, wake = self._step(kind, arg, now)
                if done:
                    index += 1
                    self.outcome.steps_done = index
                    continue
            if index >= len(self.steps) and not self.out and self._ended():
                return
            self._wait(min(self.deadline, wake if wake > now else now + 0.05))
            if self.closed:
                return

    def _ended(self) -> bool:
        o = self.outcome
        return o.eof or o.reset

    def _sending_over(self) -> bool:
        """A send failed, or the peer reset: nothing more can go out (a later step's bytes
        are dropped, or they would wait forever to be written)."""
        return bool(self.outcome.send_error) or self.outcome.reset

    def _step(self, kind: str, arg: object, now: float) -> tuple[bool, float]:
        o = self.outcome
        if kind == "send":
            assert isinstance(arg, bytes)
            if not self._sending_over():
                self.out += arg
            return True, 0.0
        if kind == "urgent":
            assert isinstance(arg, bytes)
            if not self._sending_over():
                try:
                    self.sock.send(arg, socket.MSG_OOB)
                except BlockingIOError:
                    return False, now + 0.002
                except OSError as err:
                    o.send_error = errno.errorcode.get(err.errno or 0, str(err))
            return True, 0.0
        if kind == "pause":
            assert isinstance(arg, float)
            return True, now + arg
        if kind == "shut":
            if not self._sending_over():
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError as err:
                    o.send_error = errno.errorcode.get(err.errno or 0, str(err))
            return True, 0.0
        if kind in ("reset", "close"):
            self._close(kind == "reset")
            return True, 0.0
        if kind == "until_got":
            assert isinstance(arg, int)
            return len(o.got) >= arg or o.eof or o.reset, 0.0
        if kind == "until_eof":
            return o.eof or o.reset, 0.0
        if kind == "echo":
            self.echo = bool(arg)
            if self.echo:
                self.out += o.got
            return True, 0.0
        raise ValueError(f"unknown step {kind}")

    def _wait(self, until: float) -> None:
        o = self.outcome
        reading = not (o.eof or o.reset)
        writing = bool(self.out) and not self._sending_over()
        if not writing:
            self.out.clear()
        timeout = max(0.0, until - time.monotonic())
        r, w, _ = select.select([self.sock] if reading else [], [self.sock] if writing else [], [], timeout)
        if w:
            self._write()
        if r and not self.closed:
            self._read()

    def _write(self) -> None:
        try:
            n = self.sock.send(self.out[:1 << 18])
        except BlockingIOError:
            return
        except OSError as err:
            self.outcome.send_error = errno.errorcode.get(err.errno or 0, str(err))
            self.out.clear()
            return
        del self.out[:n]

    def _read(self) -> None:
        o = self.outcome
        try:
            chunk = self.sock.recv(self.read_chunk)
        except BlockingIOError:
            return
        except OSError as err:
            o.reset = True
            if err.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                o.send_error = o.send_error or errno.errorcode.get(err.errno or 0, str(err))
            return
        if not chunk:
            o.eof = True
            return
        o.got += chunk
        if self.echo:
            self.out += chunk
        if self.read_pause:
            time.sleep(self.read_pause)

    def _close(self, reset: bool) -> None:
        self.closed = True
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.sock.close()
        except OSError:
            pass
