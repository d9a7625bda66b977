"""The supervisor: the process `pyproxy` is started as, which holds what must outlive a crash.

Design (HAProxy's master-worker, for a proxy whose kernel rules stay when it dies):
- The process the container (or systemd, or a shell) starts is this small parent. It binds
  the listening sockets -- TCP and UDP on 127.0.0.1 and [::1] (the reuseport group of
  `--workers N`), /healthz and /metrics -- and keeps a copy of each for its whole life. It
  runs the serving processes as children (fork, no exec: the config is parsed once) and
  gives each its listeners over a control channel (link.py). A child that took its
  listeners over from a running predecessor instead (a rollout: handover.py, unchanged)
  sends copies back to this parent, and so does a child that binds its own hand-over
  socket; so whatever serves, this parent holds the same sockets.
- When a child dies for any reason (kill -9, OOM kill, a segfault in the engine, an
  exception out of the loop), the sockets do not close: the kernel goes on completing TCP
  handshakes into the accept queue and keeping UDP datagrams in the receive buffer, and
  the next child serves them. Nothing is refused or reset. The next child is a *warm
  standby*: forked and fully imported beforehand, blocked on its control channel; it is
  sent `go` with the listeners, restores the state snapshot (affinity pins with their
  ages), programs the kernel in one transaction and serves. Then a new standby is forked.
  There is one standby per slot (`--workers N`: N), so that a crash of every worker at
  once (the same bad input reaching each) is served as fast as a crash of one.
- A crash loop (respawn.py: the 3rd death within a minute on) is slowed down with
  back-off, logged, and reported: while no child serves, this parent answers /healthz
  itself on the listener it holds, 503 with why; otherwise requests wait in the queue for
  the next child. A child that exits with a failure status before any served is a
  start-up error (bad manifests, bad config): the parent exits with its status.
- Planned restarts stay the children's business (handover.py): the new supervisor cannot
  bind the ports, starts its children without listeners, and each takes over from its
  counterpart over the hand-over socket, then sends its listeners to its own parent before
  it tells the old child it serves. The old child tells its parent `giving` when it hands
  the listeners out and `gone` once the successor serves (or once it released them for a
  successor it refused): the old parent then closes its copies and never respawns that
  slot; it exits when its children have. An old child that dies between `giving` and
  `gone` may have handed its listeners out already: its parent waits (up to
  `handOverTimeout`) for a successor to replace the hand-over socket's path (inode) before
  it respawns.
- The hand-over socket is held the same way (the first child binds it and sends a copy; a
  respawned child is given it), so a successor that connects during a crash waits in its
  backlog and is answered by the respawned child.
- SIGTERM/SIGINT are forwarded to the serving children (each drains as it always did); a
  second one too. Children still there `STOP_GRACE` seconds later are killed. A child
  asks the kernel to kill it if this parent dies (PR_SET_PDEATHSIG), so a `kill -9` of the
  parent is the old crash (the container restarts), never orphans.
- It imports the serving code once after binding (`preload`), before the first fork, so
  that its children share those pages rather than each importing a copy; it runs none of it.
- This process does nothing that can fail under load: no API watch, no relay, no C engine,
  no event loop; a `selectors` loop over the control channels, a signal wake-up pipe and,
  only while no child serves, the /healthz listener. `<stateDir>/supervisor.json` says
  which pid serves which slot (for `kill -9` tests and the bench).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyproxy.config import ProxyConfig, split_host_port
from pyproxy.heap import settle
from pyproxy.lifecycle.channel import Channel, ChannelError, Message, close_fds
from pyproxy.lifecycle.handover import socket_path
from pyproxy.lifecycle.link import SupervisorLink
from pyproxy.lifecycle.respawn import RespawnPolicy

if TYPE_CHECKING:
    from pyproxy.dataplane.workers import WorkerRole

log = logging.getLogger("pyproxy.supervisor")

STOP_GRACE = 60.0  # seconds the children get after the first request to stop
TICK = 0.1  # the loop's longest sleep
PR_SET_PDEATHSIG = 1

Serve = Callable[["WorkerRole", dict[str, socket.socket], SupervisorLink], int]


@dataclass
class Child:
    pid: int
    channel: Channel
    slot: int | None = None  # None: the warm standby
    killed: bool = False  # by this supervisor (a standby no longer needed)


@dataclass
class Slot:
    """One serving position (worker index) and the sockets held for it."""

    index: int
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    handover_inode: int = 0
    child: Child | None = None
    state: str = "down"  # down, starting, serving, giving, gone
    respawn_at: float | None = None  # a start is due then
    superseded_by: float | None = None  # died while giving: wait for a successor until then
    policy: RespawnPolicy = field(default_factory=RespawnPolicy)

    def close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


class Master:
    def __init__(self, config: ProxyConfig, serve: Serve, prepare: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic, preload: Callable[[], None] = lambda: None) -> None:
        self.config, self.serve, self.prepare, self.clock = config, serve, prepare, clock
        self.preload = preload
        self.count = config.dataplane.workers
        self.slots = [Slot(i) for i in range(self.count)]
        self.children: dict[int, Child] = {}
        self.standbys: list[Child] = []  # warm, waiting for `go`: one per slot
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.signals: list[int] = []
        self.stopping_since: float | None = None
        self.status = 0
        self.health_port = 0
        self.health_registered = False
        self.standby_after = 0.0  # no standby is forked before then (one just died young)

    # --- the listeners

    def bind(self) -> None:
        """The proxy and HTTP listeners, unless a running pyproxy holds them (a rollout: the
        children take them over and send copies back)."""
        from pyproxy.lifecycle.early import bind_early, extra_listeners
        from pyproxy.lifecycle.workers import predecessor_hands_over

        dp = self.config.dataplane
        if self.count == 1:
            got = bind_early(dp.tcpProxyPort, dp.udpProxyPort)
            if not got:
                log.info("the proxy port cannot be bound now (a running pyproxy holds it, or no permission): "
                         "the serving process takes it over or binds it itself")
                return
            self.slots[0].sockets.update(got)
        else:
            from pyproxy.dataplane.workers import reuseport_listeners

            if predecessor_hands_over(self.config):
                log.info("a running pyproxy group hands over to ours")
                return
            for slot, sock in zip(self.slots, reuseport_listeners("127.0.0.1", dp.tcpProxyPort, self.count)):
                slot.sockets["tcp"] = sock
            self.slots[0].sockets.update(extra_listeners(dp.tcpProxyPort, dp.udpProxyPort))
        for name, address in (("healthz", self.config.healthzBindAddress), ("metrics", self.config.metricsBindAddress)):
            if not address:
                continue
            host, port = split_host_port(address, name)
            try:
                self.slots[0].sockets[f"http:{port}"] = http_listener(host, port)
            except OSError as err:  # the child's server binds it (and retries) itself
                log.warning("cannot hold the %s listener %s: %s", name, address, err)
                continue
            if name == "healthz":
                self.health_port = port

    # --- the loop

    def run(self) -> int:
        self.bind()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self._preload()
        for slot in self.slots:
            self._start(slot)
        self._write_status()
        try:
            while self._busy():
                timeout = self._next_timer()
                for key, _ in self.selector.select(timeout):
                    self._ready(key.data)
                self._signals()
                self._reap()
                self._timers()
        finally:
            self._close()
        return self.status

    def _busy(self) -> bool:
        if self.stopping_since is None:
            return any(slot.state != "gone" or slot.child is not None for slot in self.slots)
        return any(slot.child is not None for slot in self.slots)

    def _next_timer(self) -> float:
        return TICK

    def _ready(self, what: object) -> None:
        if what == "wake":
            try:
                while self.wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        elif what == "healthz":
            self._answer_health()
        elif isinstance(what, Child):
            self._message(what)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _signals(self) -> None:
        pending, self.signals = self.signals, []
        for signum in pending:
            if signum == signal.SIGCHLD:
                continue
            if self.stopping_since is None:
                log.info("%s: stopping the serving processes (each drains as it always did)",
                         signal.Signals(signum).name)
                self.stopping_since = self.clock()
                self._kill_standbys()
            for slot in self.slots:
                if slot.child is not None:
                    _kill(slot.child.pid, signum)

    # --- children

    def _preload(self) -> None:
        """The serving code's imports, once, here: every child forked after shares their pages
        instead of importing its own copy (a standby and the serving process: tens of MiB).
        Frozen for the collector (heap.py), so that no child's collection writes to them."""
        try:
            self.preload()
        except Exception:  # noqa: BLE001 - a child imports again and reports what fails
            log.exception("preloading the serving code failed; each serving process imports it")
        settle()

    def _fork(self) -> Child:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor's code
            status = 1
            try:
                parent_end.close()
                status = self._child(child_end)
            except BaseException:  # noqa: BLE001
                log.exception("serving process failed")
            finally:
                os._exit(status)
        child_end.close()
        child = Child(pid, Channel(parent_end, 5.0))
        self.children[pid] = child
        self.selector.register(parent_end, selectors.EVENT_READ, child)
        return child

    def _child(self, sock: socket.socket) -> int:
        """In the forked child: drop the supervisor's things, import, wait for `go`, serve."""
        _die_with_parent(self.pid)
        os.setpgid(0, 0)  # a signal to the supervisor's group (Ctrl-C, the bench) reaches it alone: it forwards
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()
        for other in self.children.values():
            other.channel.close()
        for slot in self.slots:
            slot.close_sockets()
        self.prepare()  # the imports: a standby is warm when it is needed
        channel = Channel(sock, 5.0)
        sock.settimeout(None)
        go = channel.receive()
        if go.kind != "go":
            close_fds(go.fds)
            return 1
        names = go.body.get("names")
        if not isinstance(names, list) or len(names) != len(go.fds):
            close_fds(go.fds)
            return 1
        got = {str(n): socket.socket(fileno=fd) for n, fd in zip(names, go.fds)}
        sock.settimeout(5.0)
        from pyproxy.dataplane.workers import WorkerRole  # the child's imports, not the supervisor's

        count = int(go.body["count"])
        role = WorkerRole(int(go.body["index"]), count, None, int(go.body["group"]) if count > 1 else 0)
        if go.body.get("restarts"):
            log.warning("serving process %d started after %d death(s) of its predecessors%s", os.getpid(),
                        go.body["restarts"], " (crash loop)" if go.body.get("crashLoop") else "")
        link = SupervisorLink(sock, int(go.body.get("restarts") or 0), bool(go.body.get("crashLoop")))
        return self.serve(role, got, link)

    def _start(self, slot: Slot) -> None:
        """Give the slot's listeners to the standby (or a new child) and make it serve."""
        slot.respawn_at = slot.superseded_by = None
        child = self.standbys.pop(0) if self.standbys else self._fork()
        child.slot = slot.index
        slot.child = child
        slot.state = "starting"
        self._unregister_health()
        named = list(slot.sockets.items())
        body: dict[str, Any] = {"index": slot.index, "count": self.count, "group": self.pid,
                                "restarts": slot.policy.restarts, "crashLoop": slot.policy.in_loop(),
                                "names": [n for n, _ in named]}
        try:
            child.channel.send(Message("go", body, tuple(s.fileno() for _, s in named)))
        except ChannelError as err:  # it died while waiting: reaped as any death
            log.error("cannot start serving process %d: %s", child.pid, err)
        self._write_status()
        log.info("serving process %d serves slot %d%s", child.pid, slot.index,
                 "" if slot.sockets else " (taking its listeners over from the running pyproxy)")

    def _message(self, child: Child) -> None:
        try:
            message = child.channel.receive()
        except ChannelError:
            self._forget_channel(child)  # it is gone (or going): the reaper decides what that means
            return
        slot = self.slots[child.slot] if child.slot is not None else None
        if slot is None or slot.child is not child:
            close_fds(message.fds)
            return
        if message.kind == "listeners":
            names = message.body.get("names")
            if not isinstance(names, list) or len(names) != len(message.fds):
                close_fds(message.fds)
                return
            if slot.state == "gone":  # too late: they are a successor's now
                close_fds(message.fds)
                return
            for name, fd in zip(names, message.fds):
                old = slot.sockets.pop(str(name), None)
                if old is not None:
                    old.close()
                slot.sockets[str(name)] = socket.socket(fileno=fd)
            inode = message.body.get("handoverInode")
            if isinstance(inode, int) and inode:
                slot.handover_inode = inode
        elif message.kind == "serving":
            slot.state = "serving"
            slot.policy.served(self.clock())
            self._write_status()
        elif message.kind == "giving":
            slot.state = "giving"
            self._write_status()
        elif message.kind == "kept":
            slot.state = "serving"
            self._write_status()
        elif message.kind == "gone":
            log.info("serving process %d handed slot %d over (%s): this supervisor lets its listeners go",
                     child.pid, slot.index, message.body.get("why"))
            slot.state = "gone"
            slot.close_sockets()
            self._write_status()
        else:
            close_fds(message.fds)

    def _forget_channel(self, child: Child) -> None:
        try:
            self.selector.unregister(child.channel.sock)
        except (KeyError, ValueError):
            pass
        child.channel.close()

    def _reap(self) -> None:
        reaped = False
        while self.children:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped = True
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self._forget_channel(child)
            code = os.waitstatus_to_exitcode(raw)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            if child.slot is None:  # a standby
                if child in self.standbys:
                    self.standbys.remove(child)
                if not child.killed:
                    self.standby_after = self.clock() + 5.0
                    log.error("the standby serving process %d died (%s); the next one in 5s", pid, how)
                continue
            slot = self.slots[child.slot] if child.slot is not None else None
            if slot is None or slot.child is not child:
                continue
            slot.child = None
            self._died(slot, child, code, how)
        if reaped:
            self._write_status()

    def _died(self, slot: Slot, child: Child, code: int, how: str) -> None:
        now = self.clock()
        if self.stopping_since is not None or slot.state == "gone":
            log.info("serving process %d (slot %d) exited with %s", child.pid, slot.index, how)
            if code != 0 and self.status == 0 and slot.state != "gone":
                self.status = code if code > 0 else 1
            slot.state = "gone" if slot.state == "gone" else "down"
            return
        if slot.state == "giving":
            log.error("serving process %d (slot %d) died (%s) while handing over: waiting up to %.0fs for the "
                      "successor to serve before starting another", child.pid, slot.index, how,
                      self.config.lifecycle.handOverTimeout)
            slot.state = "down"
            slot.superseded_by = now + self.config.lifecycle.handOverTimeout
            return
        if slot.policy.give_up(code):
            log.error("serving process %d (slot %d) exited with %s before serving: not restarting "
                      "(a start-up error)", child.pid, slot.index, how)
            self.status = code if code > 0 else 1
            self._stop_all()
            return
        delay = slot.policy.died(now)
        slot.state = "down"
        slot.respawn_at = now + delay
        loop = f"; crash loop ({len(slot.policy.deaths)} deaths within a minute)" if slot.policy.in_loop() else ""
        log.error("serving process %d (slot %d) died (%s); starting another %s%s", child.pid, slot.index, how,
                  "now" if delay == 0 else f"in {delay:.1f}s", loop)
        if delay == 0:
            self._start(slot)
        elif slot.index == 0:
            self._register_health()

    def _timers(self) -> None:
        now = self.clock()
        if self.stopping_since is not None:
            if now - self.stopping_since > STOP_GRACE:
                for slot in self.slots:
                    if slot.child is not None:
                        _kill(slot.child.pid, signal.SIGKILL)
            return
        for slot in self.slots:
            slot.policy.stable(now)
            if slot.superseded_by is not None:
                if self._superseded(slot):
                    log.info("slot %d: a successor serves (it replaced the hand-over socket); letting go", slot.index)
                    slot.state = "gone"
                    slot.superseded_by = None
                    slot.close_sockets()
                    self._write_status()
                elif now >= slot.superseded_by:
                    log.error("slot %d: no successor took over; starting another serving process", slot.index)
                    self._start(slot)
            elif slot.respawn_at is not None and now >= slot.respawn_at and slot.child is None:
                self._start(slot)
        starting = any(s.state == "starting" for s in self.slots)  # its CPU first: it is the one awaited
        if len(self.standbys) < self.count and now >= self.standby_after and not starting and any(
                s.state != "gone" for s in self.slots):
            self.standbys.append(self._fork())  # one per tick: their imports do not all compete at once
            self._write_status()
        if all(slot.state == "gone" for slot in self.slots):
            self._kill_standbys()

    def _superseded(self, slot: Slot) -> bool:
        try:
            inode = os.stat(socket_path(self.config.lifecycle.stateDir, slot.index)).st_ino
        except OSError:
            return False
        return bool(slot.handover_inode) and inode != slot.handover_inode

    def _stop_all(self) -> None:
        self.stopping_since = self.clock()
        self._kill_standbys()
        for slot in self.slots:
            slot.respawn_at = None
            if slot.child is not None:
                _kill(slot.child.pid, signal.SIGTERM)

    def _kill_standbys(self) -> None:
        for child in self.standbys:
            child.killed = True
            _kill(child.pid, signal.SIGKILL)
        self.standbys.clear()

    # --- /healthz while no child serves

    def _register_health(self) -> None:
        sock = self.slots[0].sockets.get(f"http:{self.health_port}") if self.health_port else None
        if sock is not None and not self.health_registered:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, "healthz")
            self.health_registered = True

    def _unregister_health(self) -> None:
        if self.health_registered:
            sock = self.slots[0].sockets.get(f"http:{self.health_port}")
            if sock is not None:
                try:
                    self.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            self.health_registered = False

    def _answer_health(self) -> None:
        sock = self.slots[0].sockets.get(f"http:{self.health_port}")
        if sock is None:
            return
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        try:
            conn.settimeout(0.2)
            request = conn.recv(16384)
            conn.sendall(health_answer(request, self.slots[0].policy, self.slots[0].respawn_at, self.clock()))
        except OSError:
            pass
        finally:
            conn.close()

    # --- the status file and the end

    def _write_status(self) -> None:
        if all(slot.state == "gone" for slot in self.slots):
            return  # the file is a successor's now
        status = {"pid": self.pid,
                  "slots": {str(s.index): {"pid": s.child.pid if s.child is not None else None, "state": s.state}
                            for s in self.slots},
                  "standby": [child.pid for child in self.standbys],
                  "restarts": sum(s.policy.restarts for s in self.slots),
                  "crashLoop": any(s.policy.in_loop() for s in self.slots)}
        path = Path(self.config.lifecycle.stateDir) / "supervisor.json"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary = path.with_name(f".supervisor.json.{self.pid}.tmp")
            temporary.write_text(json.dumps(status))
            os.replace(temporary, path)
        except OSError as err:
            log.debug("cannot write %s: %s", path, err)

    def _close(self) -> None:
        self._kill_standbys()
        for slot in self.slots:
            slot.close_sockets()
        for child in list(self.children.values()):
            child.channel.close()
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()


def health_answer(request: bytes, policy: RespawnPolicy, respawn_at: float | None, now: float) -> bytes:
    """The supervisor's answer on the /healthz port while no child serves: /healthz (and
    anything else) 503 with why; /livez 200, since this process is alive and restarting its
    child (a liveness probe restarting the container would only add the kubelet's back-off)."""
    path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
    live = path.split(b"?", 1)[0] == b"/livez"
    body = json.dumps({"healthy": False, "reason": "no serving process: restarting it after a crash",
                       "crashLoop": policy.in_loop(), "restarts": policy.restarts,
                       "nextStartSeconds": round(max(0.0, (respawn_at or now) - now), 3)}).encode()
    status = b"200 OK" if live else b"503 Service Unavailable"
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def http_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """The kernel kills this child when the supervisor dies (never an orphan serving alone)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as err:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", err)
    if os.getppid() != parent:  # the supervisor died before the prctl
        os._exit(1)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as err:
        if err.errno != errno.ESRCH:
            raise
