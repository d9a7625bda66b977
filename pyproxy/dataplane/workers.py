"""Several worker processes serving one transparent TCP listener (`dataplane.workers`): the data plane's part.

Here: the worker's role (`WorkerRole`: which worker programs the kernel), the no-op nft
runner of the others, and the reuseport group of listeners. Forking and supervising the
workers is the process's life: `pyproxy/lifecycle/master.py`.

Design (the simplest correct one found; see the notes at the end):
- The supervisor (the process `pyproxy` was started as) makes N listening sockets on the
  proxy port, all in one SO_REUSEPORT group, in order, so that socket i has index i in the
  group; attaches the steering program (`steering.py`) that maps a client's IPv4 source
  address to an index; then forks N workers *before any event loop exists*. Worker i keeps
  socket i and closes the others.
- Every worker runs the whole proxy: its own store, model, service table and affinity
  table, fed by the same source (the same manifest files, or the same API server). So
  every worker sees the same Service and EndpointSlice updates, and since one client
  address always lands on the same worker, ClientIP affinity holds across connections and
  workers without sharing memory.
- Only worker 0 programs the kernel (policy routing, the nftables table) and serves UDP;
  the others apply the same syncs to their own tables with a no-op nft runner. The
  kernel's rules never depend on which worker accepts.
- The supervisor (pyproxy/lifecycle/master.py) keeps a copy of every socket of the group
  and forwards SIGTERM/SIGINT to the workers (each drains as a single proxy would). A
  worker that dies is started again alone on the same socket: the socket never left the
  group (the supervisor holds it), so the numbering and the steering stay. A worker that
  handed its socket to its counterpart in a successor group is not restarted.
- A successor group makes no sockets: when a running group answers on the hand-over
  socket, worker i of the new group takes socket i over from worker i of the old one
  (same socket, so the same place in the group and the same steering). A socket must never
  be closed by everyone holding it: it would leave the reuseport group and the kernel would
  renumber the rest, moving clients between affinity tables.

Notes: the alternative, one control-plane parent streaming table updates to workers, would
keep one watch on the API server instead of N, but needs a wire format for the table and its
own consistency story; N independent copies of a small pure model are simpler and each
worker is exactly the single-process proxy that the tests already cover.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyproxy.dataplane import steering
from pyproxy.dataplane.nft import NftRunner
from pyproxy.dataplane.sockets import IP_TRANSPARENT


@dataclass(frozen=True)
class WorkerRole:
    index: int = 0
    count: int = 1
    listener: socket.socket | None = None  # the TCP listener made by the supervisor (None: make one)
    group: int = 0  # the supervisor's pid: names the workers' sockets (pyproxy/observe/inspect_api.py)

    @property
    def programs_kernel(self) -> bool:
        return self.index == 0


class NullNftRunner(NftRunner):
    """The nft runner of workers that do not program the kernel."""

    async def apply(self, script: str) -> None:
        return None


def reuseport_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` transparent listeners in one reuseport group, steered by client address."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((host, port))
            sock.listen(4096)
            sock.setblocking(False)
        steering.attach(socks[0], count)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
