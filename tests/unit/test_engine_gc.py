"""The compiled engine takes part in garbage collection.

A relay hands the engine its own bound methods as callbacks, so relay -> engine -> callbacks
-> relay is a reference cycle. Without GC support in the Engine type (tp_traverse and
tp_clear) that cycle is never freed: every relay made and dropped (tests, reloads) would leak
itself, its engine's epoll and timer fds and whatever it references.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Any

import pytest

from pyproxy.dataplane import engine
from tests.conftest import skip_or_fail


class Holder:
    """Holds an engine whose callbacks are its own bound methods, as NativeRelay does."""

    def __init__(self, native: Any) -> None:
        self.engine = native.Engine(self.decide, self.redial, self.closed, self.moved, self.note,
                                    dial_timeouts=(0.25,), splice_after=65536, bulk_read=16384,
                                    copy_after=4, pipe_size=1 << 20)

    def decide(self, *args: object) -> None:
        return None

    def redial(self, *args: object) -> None:
        return None

    def closed(self, *args: object) -> None:
        pass

    def moved(self, *args: object) -> None:
        pass

    def note(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def native() -> Any:
    if engine.native is None:
        skip_or_fail("the compiled engine is not built (cmd/setup builds it; PYPROXY_PURE_PYTHON=1 hides it)")
    return engine.native


def test_a_dropped_relay_and_its_engine_are_collected(native: Any) -> None:
    holder = Holder(native)
    fd = holder.engine.fileno()
    gone = weakref.ref(holder)
    assert gc.is_tracked(holder.engine)
    del holder
    gc.collect()
    assert gone() is None, "the relay -> engine -> callback cycle was not collected"
    with pytest.raises(OSError):  # the engine's epoll fd went with it
        os.fstat(fd)


def test_many_dropped_engines_leave_no_fds(native: Any) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        Holder(native)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2
