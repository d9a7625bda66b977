"""An epoll set of the splice relay's own, watched by the event loop as a single fd.

Why: the event loop's `add_reader`/`add_writer` make and unmake a poll handle per fd, which
costs a dozen epoll_ctl/ioctl calls per proxied connection (seen with strace). Here each fd
is registered once (`EPOLL_CTL_ADD`), its interest changed only when it really changes
(`EPOLL_CTL_MOD`), and never unregistered: closing the socket removes it from the set.

Rules kept here:
- `watch(fd, mask, handler)` sets the fd's interest (EPOLLIN/EPOLLOUT bits) and its handler,
  which gets the event bits. A mask of 0 keeps the fd registered; the kernel still reports errors and
  hang-ups, which the handler must act on (`park` stops a level-triggered hang-up from
  spinning until the fd is wanted again).
- `forget(fd)` must be called before the fd is closed: it drops the bookkeeping (no syscall),
  since closing the fd takes it out of the set. That holds only when this process has the
  socket's last reference: a socket that may have dups elsewhere (an adopted pair's, while
  the predecessor holds its copies) is `park`ed instead, which unregisters it.
- An event reaches only the socket it was reported for: an fd forgotten or parked while a
  batch is handled gets no more of that batch's events, even if a new socket got its number
  meanwhile (a dialing pair would take the old socket's event for its connect's completion).
- SIGPIPE: every write of the twin happens in a handler, and neither `os.write`, `send` nor
  `os.splice` into a socket the peer reset after its FIN asks for MSG_NOSIGNAL. CPython
  ignores SIGPIPE; where the process does not (Python's record of it is not SIG_IGN), a batch
  runs with SIGPIPE blocked, and a SIGPIPE its writes raised is taken before the mask is put
  back (the write itself fails with EPIPE, which ends that pair).
- This is the pure-Python twin's poller; the compiled engine has its own epoll set in C.
"""

from __future__ import annotations

import asyncio
import select
import signal
from collections.abc import Callable

IN, OUT = select.EPOLLIN, select.EPOLLOUT
RDHUP = select.EPOLLRDHUP  # the peer's FIN is queued (asked for with IN: see splice.Direction.readable)
PRI = select.EPOLLPRI  # urgent data waits (asked for with IN: see splice.py's "Urgent data")
IN_RDHUP = IN | RDHUP | PRI
ERR_HUP = select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 256
SIGPIPE_ONLY = {signal.SIGPIPE}

Handler = Callable[[int], None]


class Poller:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._masks: dict[int, int] = {}
        self._handlers: dict[int, Handler] = {}
        self._gone: set[int] | None = None  # while a batch is handled: the fds let go meanwhile
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        old = self._masks.get(fd)
        if old is None:
            self._epoll.register(fd, mask)
        elif old != mask:
            self._epoll.modify(fd, mask)
        self._masks[fd] = mask
        self._handlers[fd] = handler  # a handler may change with the interest (splice.FastPair.interest)

    def park(self, fd: int) -> None:
        """Take a hung-up fd out of the set until it is watched again."""
        if self._masks.pop(fd, None) is not None:
            self._handlers.pop(fd, None)
            if self._gone is not None:
                self._gone.add(fd)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def forget(self, fd: int) -> None:
        """The fd is about to be closed, and with it its socket's last reference (which takes it
        out of the epoll set)."""
        self._masks.pop(fd, None)
        self._handlers.pop(fd, None)
        if self._gone is not None:
            self._gone.add(fd)

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        handlers = self._handlers
        gone: set[int] = set()
        self._gone = gone
        before = None if signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN else \
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGPIPE_ONLY)
        try:
            for fd, bits in events:
                handler = handlers.get(fd)
                if handler is not None and fd not in gone:
                    handler(bits)
        finally:
            self._gone = None
            if before is not None:
                _release_sigpipe(before)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


def _release_sigpipe(before: set[int | signal.Signals]) -> None:
    """Take a SIGPIPE the batch's writes raised (if it was not blocked before: one pending
    then is not ours), and put the mask back."""
    if signal.SIGPIPE not in before and signal.SIGPIPE in signal.sigpending():
        signal.sigtimedwait(SIGPIPE_ONLY, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, before)
