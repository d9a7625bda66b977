"""The splice relay's copy step: one read from a socket, written on to another.

Two implementations with one contract: `pyproxy/dataplane/_native/fastcopy.c` (built by
`cmd/setup` into `pyproxy/dataplane/_fastcopy*.so`; no GIL round trip and no exception per
empty read) and `copy_once_py` below. `copy_once` is the compiled one when it imports and
`PYPROXY_PURE_PYTHON` is not set to 1, else the Python one; `NATIVE` says which.

copy_once(src_fd, dst_fd) -> int:
- n > 0: n bytes were read from src and all were written to dst;
- 0: src sent EOF;  -1: src had nothing to read;
- -1 - n: n bytes were read, but their tail could not be written yet (dst full); `take_rest()`
  hands that tail out (once). Only ints on every path: the caller's checks stay cheap;
- any other socket error raises OSError.
At most BUFFER_SIZE bytes are read per call, into a buffer of the module's own (the event
loop is single-threaded, and nothing keeps a view of it between calls).

`dispatch` (compiled only; None without it, and poller.py then loops in Python):
dispatch(epfd, handlers) runs one `epoll_wait` with timeout 0 and calls `handlers[fd](bits)`
for each event whose fd is in the dict at that moment, building no list of events.
"""

from __future__ import annotations

import os
from collections.abc import Callable

BUFFER_SIZE = 64 * 1024
_buffer = bytearray(BUFFER_SIZE)
_view = memoryview(_buffer)

CopyOnce = Callable[[int, int], int]
TakeRest = Callable[[], bytes]
Dispatch = Callable[[int, dict[int, Callable[[int], None]]], int]
_rest = b""


def copy_once_py(src: int, dst: int) -> int:
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


def take_rest_py() -> bytes:
    global _rest
    rest, _rest = _rest, b""
    return rest


def _native() -> tuple[CopyOnce, TakeRest, Dispatch] | None:
    if os.environ.get("PYPROXY_PURE_PYTHON") == "1":
        return None
    try:
        from pyproxy.dataplane import _fastcopy  # type: ignore[attr-defined]
    except ImportError:
        return None
    assert _fastcopy.BUFFER_SIZE == BUFFER_SIZE
    native: tuple[CopyOnce, TakeRest, Dispatch] = (_fastcopy.copy_once, _fastcopy.take_rest, _fastcopy.dispatch)
    return native


_compiled = _native()
NATIVE = _compiled is not None
copy_once, take_rest = (_compiled[0], _compiled[1]) if _compiled is not None else (copy_once_py, take_rest_py)
dispatch: Dispatch | None = _compiled[2] if _compiled is not None else None
