"""The pure-Python twin's copy step: one read from a socket, written on to another.

copy_once(src_fd, dst_fd) -> int:
- n > 0: n bytes were read from src and all were written to dst;
- 0: src sent EOF;  -1: src had nothing to read;
- -1 - n: n bytes were read, but their tail could not be written yet (dst full); `take_rest()`
  hands that tail out (once). Only ints on every path: the caller's checks stay cheap;
- any other socket error raises OSError.
At most BUFFER_SIZE bytes are read per call, into a buffer of the module's own (the event
loop is single-threaded, and nothing keeps a view of it between calls). The compiled
engine (`_native/engine.c`) has its own copy step in C with the same contract.
"""

from __future__ import annotations

import os

BUFFER_SIZE = 64 * 1024
_buffer = bytearray(BUFFER_SIZE)
_view = memoryview(_buffer)
_rest = b""


def copy_once(src: int, dst: int) -> int:
    global _rest
    try:
        n = os.readv(src, (_buffer,))
    except (BlockingIOError, InterruptedError):
        return -1
    if n == 0:
        return 0
    sent = 0
    while sent < n:
        try:
            sent += os.write(dst, _view[sent:n])
        except InterruptedError:
            continue
        except BlockingIOError:
            break
    if sent == n:
        return n
    _rest = bytes(_view[sent:n])
    return -1 - n


def take_rest() -> bytes:
    global _rest
    rest, _rest = _rest, b""
    return rest
