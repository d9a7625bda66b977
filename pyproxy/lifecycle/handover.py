"""The hand-over protocol: how a running pyproxy gives its node to a successor.

Theory of operation (protocol version 1; `PROTOCOL`):

The running process (O, the old one) listens on a unix stream socket at
`<lifecycle.stateDir>/handover.sock` (worker i of `--workers N`: `handover-<i>.sock`). A new
process (S, the successor) started with the same configuration connects to it before it
binds anything. Every message is a `channel.Message` (kind + JSON body + descriptors). The
sequence, with who sends what:

  1. S -> O  hello     {protocol, release, pid, netns, node, index, workers, tcpPort, udpPort, probe}
  2. O -> S  hello     {the same fields, O's}                  or  refuse {reason}; both log it
             (a `probe` hello ends here: the supervisor of `--workers N` asks before forking)
  3. O -> S  state     {sync: the cluster store, affinity: every pin with its age}
  4. O -> S  listeners {names: [...]} + one descriptor per name: "tcp", "udp", "healthz",
             "metrics", "hc:<port>" (health check node ports) -- the very sockets, so their
             accept queues are shared and nothing queued is lost
  5. S: restores the store, syncs (the kernel's rules are rewritten in one transaction,
     never flushed), restores affinity, and serves on the inherited sockets. From here
     both processes accept from the same queues; either one serves a new connection.
     S -> O  serving   {}
  6. O stops accepting: closes its copies of every listener (the sockets live on in S),
     stops its sync, its watches and its snapshot writer; nothing is reset.
     O -> S  affinity  {affinity}   the pins as of now (a younger pin already in S wins)
  7. O -> S  the messages of `connections.export_connections(app)` (the established
             connections; their kinds are the `move` helper's and never one of ours)
     O -> S  end       {connections: n}
             (O keeps the descriptors of what it sent: the kernel gave S its own copies;
             the hook decides when O closes them, `export_finished` below)
  8. S: `connections.adopt_connections(app, messages)`
     S -> O  done      {adopted: bool, reason}
     O: `connections.export_finished(app, adopted)` if defined; then drains whatever it
     still holds up to `drainTimeout`, and exits (`lifecycle.afterHandOver: exit`) or
     waits for SIGTERM (`wait`: a DaemonSet pod whose process ended would be restarted by
     the kubelet and take the node back).
  9. S binds its own hand-over socket under a temporary name and renames it over the
     path: the next successor finds S; O's listening socket is orphaned and closed.

Versions: a hello with another `protocol` is refused (`refuse {reason}`), and so is one
from another network namespace (another node sharing the file system: the kernel lab), or
with another worker count or proxy ports. After a refusal O goes on exactly as before the
attempt; on SIGTERM it drains as it always did (stops accepting, releases its listeners at
once so S can bind them, finishes open connections up to the drain bound). S binds its
own listeners, retrying until O has released them. An upgrade from a release that speaks
no hand-over at all is that same path: S finds no socket and binds when O is gone.

Failures: any error before step 5's `serving` aborts the attempt: S closes what it
received and starts as if alone; O never stopped serving. The hooks of step 7/8 may be
missing (`pyproxy/lifecycle/connections.py` is optional) or raise: then no connection is
moved and O drains them all, as today. Every step has a deadline (`handOverTimeout`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Protocol

from pyproxy.lifecycle.channel import Channel, ChannelError, Message, body_of, close_fds

log = logging.getLogger("pyproxy.lifecycle")

PROTOCOL = 1
OURS = frozenset({"hello", "refuse", "state", "listeners", "serving", "affinity", "end", "done"})


def spoken_protocol() -> int:
    """The protocol this process speaks; PYPROXY_HANDOVER_PROTOCOL overrides it (tests of refusal)."""
    raw = os.environ.get("PYPROXY_HANDOVER_PROTOCOL", "")
    return int(raw) if raw.isdigit() else PROTOCOL


def netns_id() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def socket_path(state_dir: str, index: int = 0) -> str:
    return os.path.join(state_dir, "handover.sock" if index == 0 else f"handover-{index}.sock")


@dataclass(frozen=True)
class Identity:
    protocol: int
    release: str
    pid: int
    netns: int
    node: str
    index: int
    workers: int
    tcpPort: int
    udpPort: int
    probe: bool = False


def identity_of(config: Any, node: str, index: int = 0, workers: int = 1, probe: bool = False) -> Identity:
    """This process's hello (config: a ProxyConfig)."""
    from pyproxy import __version__

    dp = config.dataplane
    return Identity(spoken_protocol(), __version__, os.getpid(), netns_id(), node, index, workers,
                    dp.tcpProxyPort, dp.udpProxyPort, probe)


def refusal(mine: Identity, theirs: Mapping[str, Any]) -> str | None:
    """Why a hand-over between these two cannot be done, or None (pure)."""
    if theirs.get("protocol") != mine.protocol:
        return f"hand-over protocol {theirs.get('protocol')!r} is not this process's {mine.protocol}"
    if theirs.get("netns") != mine.netns:
        return "the other process runs in another network namespace (another node)"
    for name in ("workers", "index", "tcpPort", "udpPort"):
        if theirs.get(name) != getattr(mine, name):
            return f"{name} differs ({theirs.get(name)!r} there, {getattr(mine, name)!r} here)"
    return None


def _hooks() -> ModuleType | None:
    """`pyproxy/lifecycle/connections.py` (the moving of established connections), if present."""
    try:
        return importlib.import_module("pyproxy.lifecycle.connections")
    except ModuleNotFoundError as err:
        if err.name != "pyproxy.lifecycle.connections":
            log.error("cannot load the connection hand-over hooks: %s; open connections will drain", err)
        return None
    except Exception as err:  # noqa: BLE001 - a broken hook module must not stop a hand-over
        log.error("cannot load the connection hand-over hooks: %r; open connections will drain", err)
        return None


class Giver(Protocol):
    """What the old process offers (ProxyApp)."""

    def identity(self, probe: bool = False) -> Identity: ...

    def state_body(self) -> dict[str, Any]: ...

    def affinity_body(self) -> dict[str, Any]: ...

    def listener_sockets(self) -> list[tuple[str, int]]: ...

    async def release_listeners(self) -> None: ...


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


class HandOverServer:
    """The old side: answers successors on the hand-over socket, one at a time."""

    def __init__(self, path: str, giver: Giver, app: Any, timeout: float,
                 notify: Callable[[str], None] = lambda _: None) -> None:
        self.path = path
        self.giver = giver
        self.app = app
        self.timeout = timeout
        self.notify = notify  # "giving", "kept", "gone": told to the supervisor (link.py)
        self.sock: socket.socket | None = None
        self.inode = 0  # of the path this process bound (the supervisor watches it for a successor)
        self.refused: str | None = None  # why the last successor was refused (drain on SIGTERM)
        self.handed_over = asyncio.Event()  # step 6 reached: this process no longer accepts
        self.finished = asyncio.Event()  # the whole sequence is over (successfully or not)
        self.adopted = False

    def bind(self) -> None:
        """Listen at `path`, replacing whatever is there in one rename (step 9)."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}"
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temporary)
            os.chmod(temporary, 0o600)
            sock.listen(4)
            sock.setblocking(False)
            self.inode = os.stat(temporary).st_ino
            os.rename(temporary, self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        log.info("hand-over socket: %s (protocol %d)", self.path, spoken_protocol())

    def adopt(self, sock: socket.socket) -> None:
        """Listen on a socket bound by an earlier process of this supervisor (a respawn):
        a successor that connected meanwhile waits in its backlog."""
        sock.setblocking(False)
        self.sock = sock
        log.info("hand-over socket: %s (protocol %d, kept by the supervisor)", self.path, spoken_protocol())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def serve(self) -> None:
        """Answer successors until one has taken over (then return)."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while not self.handed_over.is_set():
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(True)
            channel = Channel(conn, self.timeout)
            try:
                await self._give(channel)
            except ChannelError as err:
                if self.handed_over.is_set():
                    log.error("hand-over: the successor failed after taking the listeners: %s", err)
                    self.finished.set()
                else:
                    log.error("hand-over aborted, still serving: %s", err)
                    self.notify("kept")
            except Exception:  # noqa: BLE001 - a bug here must not end the hand-over server unseen
                log.exception("hand-over failed unexpectedly%s",
                              "" if self.handed_over.is_set() else "; still serving")
                if self.handed_over.is_set():
                    self.finished.set()
                else:
                    self.notify("kept")
            finally:
                channel.close()
        self.close()

    async def _give(self, channel: Channel) -> None:
        mine = self.giver.identity()
        theirs = body_of(await _thread(channel.receive, False), "hello")
        reason = refusal(mine, theirs)
        if reason is not None and theirs.get("netns") != mine.netns:
            log.warning("a pyproxy of another node (pid %s, another network namespace) asked for a hand-over on %s: "
                        "refused; give each node its own lifecycle.stateDir", theirs.get("pid"), self.path)
        elif reason is not None:
            log.error("hand-over refused to pid %s (release %s): %s; this process keeps serving and drains "
                      "as before when stopped", theirs.get("pid"), theirs.get("release"), reason)
            self.refused = reason
        if reason is not None:
            foreign = theirs.get("netns") != mine.netns
            await _thread(channel.send, Message("refuse", {"reason": reason, "foreign": foreign, **asdict(mine)}))
            return
        await _thread(channel.send, Message("hello", asdict(mine)))
        if theirs.get("probe"):
            return
        log.info("hand-over: pid %s (release %s) is taking over", theirs.get("pid"), theirs.get("release"))
        await _thread(channel.send, Message("state", self.giver.state_body()))
        named = self.giver.listener_sockets()
        self.notify("giving")
        await _thread(channel.send, Message("listeners", {"names": [n for n, _ in named]}, tuple(fd for _, fd in named)))
        channel.settimeout(self.timeout * 3)  # the successor syncs before it answers
        body_of(await _thread(channel.receive, False), "serving")
        channel.settimeout(self.timeout)
        self.handed_over.set()  # point of no return: the successor serves
        self.notify("gone")
        await self.giver.release_listeners()
        log.info("hand-over: the successor serves; this process stopped accepting")
        await _thread(channel.send, Message("affinity", self.giver.affinity_body()))
        messages = await self._export()
        await _thread(channel.send_all, messages)
        await _thread(channel.send, Message("end", {"connections": len(messages)}))
        done = body_of(await _thread(channel.receive, False), "done")
        self.adopted = bool(done.get("adopted"))
        if messages and not self.adopted:
            log.error("hand-over: the successor did not adopt the connections (%s)", done.get("reason"))
        await self._finished_hook(self.adopted)
        log.info("hand-over complete: %d connection message(s) %s", len(messages),
                 "adopted" if self.adopted else "not adopted")
        self.finished.set()

    async def _export(self) -> list[Message]:
        hooks = _hooks()
        export: Callable[[Any], Awaitable[list[Message]]] | None = getattr(hooks, "export_connections", None)
        if export is None:
            return []
        try:
            messages = list(await export(self.app))
        except Exception:  # noqa: BLE001 - the default is to drain them here
            log.exception("hand-over: exporting connections failed; they drain in this process")
            return []
        bad = [m.kind for m in messages if m.kind in OURS]
        if bad:
            log.error("hand-over: connection messages may not use the kinds %s; they drain here", bad)
            return []
        return messages

    async def _finished_hook(self, adopted: bool) -> None:
        finished = getattr(_hooks(), "export_finished", None)
        if finished is None:
            return
        try:
            await finished(self.app, adopted)
        except Exception:  # noqa: BLE001
            log.exception("hand-over: export_finished failed")


@dataclass
class Inherited:
    """What a successor received in steps 1-4 (the channel stays open for steps 5-8)."""

    channel: Channel
    peer: Mapping[str, Any]
    state: Mapping[str, Any]
    sockets: dict[str, socket.socket]

    def take(self, name: str) -> socket.socket | None:
        return self.sockets.pop(name, None)

    def close_unused(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


@dataclass(frozen=True)
class Outcome:
    """The result of looking for a predecessor: `inherited`, or why not."""

    inherited: Inherited | None = None
    refused: str | None = None  # a predecessor runs but refused: bind once it lets go
    found: bool = False  # a predecessor answered at all
    failed: bool = False  # it answered, then the attempt broke (it may have died: its supervisor respawns it)


def take_over(path: str, mine: Identity, timeout: float) -> Outcome:
    """Steps 1-4, blocking (run it in a thread)."""
    try:
        channel = Channel.connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return Outcome()  # nobody there, or a crashed one's stale socket
    except OSError as err:
        log.warning("hand-over socket %s: %s; starting without a hand-over", path, err)
        return Outcome()
    try:
        channel.send(Message("hello", asdict(mine)))
        answer = channel.receive(expect_fds=False)
        if answer.kind == "refuse" and answer.body.get("foreign"):
            log.warning("hand-over socket %s belongs to a pyproxy of another node (another network namespace): "
                        "not handing over; give each node its own lifecycle.stateDir", path)
            channel.close()
            return Outcome()
        if answer.kind == "refuse":
            why = str(answer.body.get("reason"))
            log.error("hand-over refused by pid %s (release %s): %s; binding the listeners once it releases them",
                      answer.body.get("pid"), answer.body.get("release"), why)
            channel.close()
            return Outcome(refused=why, found=True)
        theirs = body_of(answer, "hello")
        reason = refusal(mine, theirs)
        if reason is not None:
            log.error("hand-over refused to pid %s (release %s): %s; binding the listeners once it releases them",
                      theirs.get("pid"), theirs.get("release"), reason)
            channel.close()
            return Outcome(refused=reason, found=theirs.get("netns") == mine.netns)
        if mine.probe:
            channel.close()
            return Outcome(found=True)
        state = body_of(channel.receive(expect_fds=False), "state")
        listeners = channel.receive()
        names = body_of(listeners, "listeners").get("names")
        if not isinstance(names, list) or len(names) != len(listeners.fds):
            close_fds(listeners.fds)
            raise ChannelError("listeners: names and descriptors do not match")
        sockets = {str(n): socket.socket(fileno=fd) for n, fd in zip(names, listeners.fds)}
        log.info("hand-over: pid %s (release %s) handed over %s", theirs.get("pid"), theirs.get("release"),
                 ", ".join(sockets) or "no listeners")
        return Outcome(Inherited(channel, theirs, state, sockets), found=True)
    except ChannelError as err:
        log.error("hand-over from %s failed before anything was taken: %s", path, err)
        channel.close()
        return Outcome(refused=str(err), found=True, failed=True)


class Taker(Protocol):
    def merge_affinity(self, body: Mapping[str, Any]) -> int: ...


async def complete(inherited: Inherited, taker: Taker, app: Any) -> None:
    """Steps 5-8 on the successor's side, once it serves on the inherited sockets."""
    channel = inherited.channel
    try:
        await _thread(channel.send, Message("serving", {"pid": os.getpid()}))
        restored = taker.merge_affinity(body_of(await _thread(channel.receive, False), "affinity"))
        messages: list[Message] = []
        while True:
            message = await _thread(channel.receive)
            if message.kind == "end":
                break
            messages.append(message)
        adopted, reason = await _adopt(app, messages)
        await _thread(channel.send, Message("done", {"adopted": adopted, "reason": reason}))
        log.info("hand-over complete: %d affinity pins merged, %d connection message(s) %s", restored,
                 len(messages), "adopted" if adopted else "not adopted")
    except ChannelError as err:
        log.error("hand-over: the predecessor stopped answering after we took over: %s (we serve)", err)
    finally:
        channel.close()


async def _adopt(app: Any, messages: list[Message]) -> tuple[bool, str]:
    if not messages:
        return True, ""
    adopt = getattr(_hooks(), "adopt_connections", None)
    if adopt is None:
        for message in messages:
            close_fds(message.fds)
        return False, "this release cannot adopt connections"
    try:
        await adopt(app, messages)
    except Exception as err:  # noqa: BLE001 - the predecessor then drains them
        log.exception("hand-over: adopting connections failed")
        return False, f"{type(err).__name__}: {err}"
    return True, ""
