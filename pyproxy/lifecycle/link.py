"""The control channel between the supervisor (master.py) and one serving process it started.

Rules kept here:
- One unix stream socketpair per child, made by the supervisor before it forks; framed
  messages of channel.py (kind + JSON body + descriptors).
- Supervisor -> child: `go` {index, count, group, restarts, crashLoop, names} + one descriptor
  per name: the listeners to serve on (the names of lifecycle/listeners.py and handover.py:
  "tcp", "tcp6", "udp", "udp6", "http:<port>", and "handover", the listening hand-over
  socket). A warm standby waits for it; nothing else is ever sent that way.
- Child -> supervisor, each sent once it is true, never blocking the child for long (a
  few small frames into a socket buffer the supervisor drains):
  `listeners` {names, handoverInode} + descriptors: what the child serves on now (the
      supervisor keeps copies of these, so that the sockets outlive the child);
  `serving` {}: the child serves (the respawn policy counts from here);
  `giving` {}: a successor is being handed the listeners (step 4 of handover.py);
  `kept` {}: that hand-over failed before the successor served: the child serves on;
  `gone` {why}: the child handed over (step 6) or released its listeners for a successor
      that was refused: the supervisor must drop its copies and never respawn this slot.
- A child with no link (started without a supervisor: tests, `--no-supervisor`) sends
  nothing; every call here is then a no-op. A send that fails (the supervisor is gone:
  the child is about to be killed with it) is logged once and ignored.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pyproxy.lifecycle.channel import Channel, ChannelError, Message

log = logging.getLogger("pyproxy.lifecycle")


class SupervisorLink:
    """The child's end of its control channel."""

    def __init__(self, sock: socket.socket | None, restarts: int = 0, crash_loop: bool = False) -> None:
        self.channel = Channel(sock, 5.0) if sock is not None else None
        self.restarts = restarts  # deaths of this slot's processes before this one was started
        self.crash_loop = crash_loop
        self.respawned = restarts > 0  # started after a death: the predecessor installed the kernel's parts
        self._broken = False

    @property
    def supervised(self) -> bool:
        return self.channel is not None

    def send(self, kind: str, body: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> None:
        if self.channel is None or self._broken:
            return
        try:
            self.channel.send(Message(kind, body or {}, fds))
        except ChannelError as err:
            self._broken = True
            log.error("cannot tell the supervisor %r: %s", kind, err)

    def listeners(self, named: list[tuple[str, int]], handover_inode: int = 0) -> None:
        if named:
            self.send("listeners", {"names": [n for n, _ in named], "handoverInode": handover_inode},
                      tuple(fd for _, fd in named))

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
