"""The cyclic garbage collector and the proxy's long-lived objects.

Rules kept here:
- A cluster's worth of objects (10,000 Services are about a million Python objects: the
  store, the service table) lives for the life of the process. Left to itself, CPython's
  collector walks all of them again at each full collection, and while they are being
  built (a first list, a first sync) full collections come every time the heap grows by a
  quarter: about half of the first sync's CPU at 10k (bench/firstsync.py).
- `settle()` (gc.freeze) moves every object alive now out of the collector's generations,
  so that later collections walk only what was built since. It is called where objects
  that will stay were just built: after each page of a list, and after a full sync.
- The price: a reference cycle among frozen objects that later becomes garbage is not
  collected (objects without cycles are still freed at once by reference counting, and the
  model's objects hold no cycles). Nothing else changes: the collector stays on.
- `building()`: a block that builds long-lived objects in one go (a full sync's table) runs
  with the collector paused and settles what it built before the collector resumes: no
  collection walks the new objects while they are being made (a fifth of the table update's
  CPU at 10,000 Services otherwise).
- `trim()` gives the C heap's free pages back to the kernel (glibc's malloc_trim): after a
  first sync the list pages' buffers are freed, but glibc keeps the pages (about 12 MiB at
  10,000 Services); libnftables' parser leaves 35 MiB after a full table. Elsewhere
  (another C library) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def settle() -> None:
    """Everything alive now is long-lived: later collections skip it (see the module doc)."""
    gc.freeze()


@contextmanager
def building() -> Iterator[None]:
    """The collector paused for the block; what it built is settled before it resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        settle()
        if was_enabled:
            gc.enable()


def frozen() -> int:
    """How many objects `settle` has moved out of the collector's reach (metrics, tests)."""
    return gc.get_freeze_count()


def trim() -> None:
    """Free pages of the C heap back to the kernel (see the module doc)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function
