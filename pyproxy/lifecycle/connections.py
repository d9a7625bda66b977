"""Open connections move to the successor: the two hooks of the hand-over.

Theory of operation:
- `export_connections(app)` runs in the old process once the successor holds the
  listeners and this process has stopped accepting. It takes every connection that can
  move out of this process's relays and returns one `Message` per connection: kind
  `tcp-pair` or `udp-flow`, the body from `connstate` (versioned), and the fds it needs
  (dups: the kernel sockets stay alive in them, so nothing is sent on the wire when the
  relays let go of their own fds). The channel sends copies and leaves these open.
- `export_finished(app, adopted)` (old process, once the successor answered): adopted, the
  dups are closed and the connections are the successor's alone; not adopted (the
  successor cannot adopt, or failed before taking any), this process takes them back with
  the same adoption code and they drain here, as if they had never left.
- `adopt_connections(app, messages)` runs in the successor: each pair or flow is taken up
  by its relay and goes on where it stopped. A body it cannot read (another state
  version, a malformed field) or a wrong number of fds costs that one connection: its
  sockets are reset (the peers learn at once, rather than waiting on a dead socket), the
  rest go on, and the reason is logged. Messages of other kinds are left alone.
- What moves: every established TCP pair (its held bytes and pipes come along) and every
  UDP flow. What drains in the old process as before: pairs still dialing their endpoint.
  Half-closed pairs move.
- A pair may change relay on the way (the compiled engine <-> its pure-Python twin): the
  state is one format. A direction that holds bytes *and* a pipe (a state neither relay
  writes today, but the format allows) has its pipe read out here into its held bytes.
- The hooks need nothing of the process but its relays (`Relays`).
- With `--workers N` each worker is its own process with its own relay: each one exports
  its own connections, and its successor worker (the same index) adopts them.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from typing import Protocol

from pyproxy.dataplane.relay import TcpRelay, reset_fds
from pyproxy.dataplane.udp import UdpRelay
from pyproxy.lifecycle.channel import Message, close_fds
from pyproxy.dataplane.connstate import (
    TCP_KIND,
    UDP_KIND,
    DirectionState,
    StateError,
    TcpState,
    decode_tcp,
    decode_udp,
    encode_tcp,
    encode_udp,
)

log = logging.getLogger("pyproxy.handover")

KINDS = (TCP_KIND, UDP_KIND)


class Relays(Protocol):
    """What the hooks need of a process: its relays."""

    @property
    def relay(self) -> TcpRelay: ...

    @property
    def udp(self) -> UdpRelay: ...


async def export_connections(app: Relays) -> list[Message]:
    """Take every movable connection out of this process (see the module header)."""
    global _exported
    messages = [Message(TCP_KIND, encode_tcp(state), tuple(fds)) for state, fds in await app.relay.detach_pairs()]
    tcp = len(messages)
    messages += [Message(UDP_KIND, encode_udp(state), (fd,)) for state, fd in app.udp.detach_flows()]
    log.info("handing over %d TCP connections and %d UDP flows; %d connections drain here", tcp,
             len(messages) - tcp, len(app.relay.pairs))
    _exported = messages
    return messages


_exported: list[Message] = []  # what this process handed out and still holds the dups of


async def export_finished(app: Relays, adopted: bool) -> None:
    """The successor has answered: drop our dups, or take the connections back."""
    global _exported
    messages, _exported = _exported, []
    if adopted:
        for message in messages:
            close_fds(message.fds)
        return
    if messages:
        log.warning("the successor did not take up the connections: %d go on here and drain", len(messages))
        await adopt_connections(app, messages)


async def adopt_connections(app: Relays, messages: list[Message]) -> None:
    """Go on serving the connections `export_connections` handed over."""
    tcp = udp = 0
    flows = []
    for message in messages:
        if message.kind not in KINDS:
            continue
        fds = list(message.fds)
        try:
            if message.kind == UDP_KIND:
                flow = decode_udp(message.body)
                _check_fds(message.kind, fds, flow.fd_count)
                flows.append((flow, socket.socket(fileno=fds[0])))
                continue
            state = decode_tcp(message.body)
            _check_fds(message.kind, fds, state.fd_count)
            if any(d.held and d.pipe for d in (state.up, state.down)):
                fds, pipes = fds[:2], fds[2:]
                state = _absorb_pipes(state, pipes)
        except (StateError, OSError) as err:
            log.error("cannot take up a moved connection (%s): %s; resetting it", message.kind, err)
            _reset_fds(fds)
            continue
        try:
            await app.relay.adopt_pair(state, fds)  # from here on the relay owns the fds
        except Exception as err:  # never raise once some are taken up: they would run twice
            log.error("cannot take up a moved connection from %s:%s: %r", *state.client, err)
            continue
        tcp += 1
    if flows:
        udp = app.udp.adopt_flows(flows)
    log.info("took up %d TCP connections and %d UDP flows from the previous process", tcp, udp)


def _check_fds(kind: str, fds: list[int], expected: int) -> None:
    if len(fds) != expected:
        raise StateError(f"{kind}: {len(fds)} descriptors, its state needs {expected}")


def _absorb_pipes(state: TcpState, pipes: list[int]) -> TcpState:
    """The same pair without pipes: what each holds goes after the direction's held bytes
    (the bytes were read first), and the pipes (read, write end per direction) are closed."""
    ends = iter(zip(pipes[::2], pipes[1::2]))
    directions: list[DirectionState] = []
    try:
        for direction in (state.up, state.down):
            if direction.pipe:
                read_end, _ = next(ends)
                directions.append(replace(direction, held=direction.held + _read_pipe(read_end, direction.in_pipe),
                                          pipe=False, in_pipe=0))
            else:
                directions.append(direction)
    finally:
        for fd in pipes:
            os.close(fd)
    return replace(state, up=directions[0], down=directions[1])


def _read_pipe(fd: int, size: int) -> bytes:
    """The `size` bytes a moved pipe holds (they are all there: nobody writes to it)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise StateError(f"a moved pipe held {size - left} bytes, its state said {size}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _reset_fds(fds: list[int]) -> None:
    """Close received fds; sockets with a reset, so their peers do not wait on them."""
    reset_fds(fds)