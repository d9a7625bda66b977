"""pyproxy/heap.py: settle() takes what is alive out of the collector's generations; trim() runs."""

from __future__ import annotations

import gc

from pyproxy import heap


def test_settle_freezes_what_is_alive_and_collections_skip_it() -> None:
    before = heap.frozen()
    try:
        kept = [[i] for i in range(1000)]  # containers: tracked by the collector
        heap.settle()
        assert heap.frozen() >= before + 1000
        assert len(kept) == 1000
    finally:
        gc.unfreeze()  # leave the test process as it was


def test_trim_is_glibcs_malloc_trim_here() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        heap.trim()  # nothing to give back through
        return
    assert heap._malloc_trim() is not None
    heap.trim()


def test_building_pauses_the_collector_and_settles_what_was_built() -> None:
    before = heap.frozen()
    try:
        with heap.building():
            assert not gc.isenabled()
            built = [[i] for i in range(500)]
        assert gc.isenabled() and heap.frozen() >= before + 500 and len(built) == 500
        gc.disable()
        with heap.building():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
        gc.unfreeze()
