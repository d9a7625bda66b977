"""nftables transactions through libnftables in this process, instead of an `nft` process each.

Rules kept here:
- The same contract as `nft.NftRunner`: one script, one transaction (libnftables'
  `nft_run_cmd_from_buffer` is what `nft -f` runs), an `NftError` with nft's own message
  when the kernel or the parser refuses it. What differs is the price: no fork and exec of
  a binary that loads five libraries per sync (4 ms of CPU on this machine against 0.1 ms
  for a one-element update; a Service proxy syncs up to ten times a second).
- One context, used by one thread at a time (a lock), in a worker thread: the library call
  releases the GIL and the event loop goes on while the kernel applies a large table.
- libnftables' parser allocates about 50 times a script's size (35 MiB for a full table of
  10,000 Services) and frees it, but the C heap keeps the pages: after a script larger
  than TRIM_AFTER, `heap.trim` gives them back (an `nft` process simply exited).
- `open_runner("library")` falls back to the `nft` command when libnftables.so.1 cannot be
  loaded (logged once); `open_runner("command")` always runs the command.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from typing import Any

from pyproxy.dataplane.nft import NftError, NftRunner
from pyproxy.heap import trim

log = logging.getLogger("pyproxy.dataplane")

LIBRARY = "libnftables.so.1"
TRIM_AFTER = 64 * 1024  # bytes of script


class LibNftRunner(NftRunner):
    """`NftRunner` on libnftables (see the module doc)."""

    def __init__(self, library: Any) -> None:
        super().__init__()
        self._lib = library
        self._lock = threading.Lock()
        self._ctx = library.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        library.nft_ctx_buffer_output(self._ctx)  # nothing to stdout: kept, and dropped
        library.nft_ctx_buffer_error(self._ctx)

    async def apply(self, script: str) -> None:
        if script:
            await asyncio.to_thread(self.apply_now, script)

    def apply_now(self, script: str) -> None:
        with self._lock:
            status = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            if len(script) > TRIM_AFTER:
                trim()
            if status != 0:
                error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
                raise NftError(error or f"libnftables refused the transaction ({status})")

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def load_library(name: str = LIBRARY) -> Any:
    """libnftables with the prototypes used here (OSError when it cannot be loaded)."""
    lib = ctypes.CDLL(name, use_errno=True)
    lib.nft_ctx_new.argtypes, lib.nft_ctx_new.restype = [ctypes.c_uint32], ctypes.c_void_p
    lib.nft_ctx_free.argtypes, lib.nft_ctx_free.restype = [ctypes.c_void_p], None
    lib.nft_ctx_buffer_output.argtypes, lib.nft_ctx_buffer_output.restype = [ctypes.c_void_p], ctypes.c_int
    lib.nft_ctx_buffer_error.argtypes, lib.nft_ctx_buffer_error.restype = [ctypes.c_void_p], ctypes.c_int
    lib.nft_ctx_get_error_buffer.argtypes, lib.nft_ctx_get_error_buffer.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def open_runner(mode: str) -> NftRunner:
    """The runner `dataplane.nftables` asks for: "library" (falling back to the command) or "command"."""
    if mode == "library":
        try:
            return LibNftRunner(load_library())
        except (OSError, AttributeError) as err:
            log.warning("libnftables cannot be used (%s): running the nft command for each sync", err)
    return NftRunner()
