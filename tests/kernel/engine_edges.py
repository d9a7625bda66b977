"""Driver of test_engine_edges.py: the compiled engine at the edges a review found.

Run in a namespace of the test's own: `python -m tests.kernel.engine_edges CASE`, on the
namespace's loopback; prints one JSON object, what the case saw. The engine is driven by
hand (its run() called when the case says), as tests/kernel/engine_bursts.py does, so that
events land in the batches the case needs. Cases:

- `stale-redial`: a dial's deadline and the completion of that dial's connect land in one
  batch. The deadline comes first: the pair redials a dead endpoint; the old socket's event
  must not be applied to the new socket (which would make the pair OPEN on a socket still
  connecting, with no deadline and no redial after it).
- `stale-poller`: the same rule in the pure-Python twin's poller: a socket closed while a
  batch is handled, and a new one given its fd number in that batch, must not get the old
  socket's event (a dialing pair would take it for its connect's completion).
- `detach-emfile engine|twin`: detach_pairs() of the real relay (NativeRelay, FastRelay) with
  8 established pairs (one of them splicing: 6 fds to hand out) and room for 5 more fds
  (RLIMIT_NOFILE): it fails with EMFILE part-way,
  and must leave every pair as it was (still relayed, no fd more or less); with the limit
  restored it hands all 8 out.
- `dial-bound`: redial() keeps answering with an endpoint that refuses; the engine must stop
  at its last dial attempt (len(dial_timeouts)) by itself and reset the client.
- `reenter`: decide() and closed() call the engine's methods back; those that change its
  state must raise RuntimeError (reading ones work), and the engine must serve on.
- `adopt-errors engine|twin`: adopt_pair() of the real relay given states it must refuse (a
  pipe the fds do not bring, a pipe where a socket should be, a relay not started, and for
  the engine a malformed direction given to Engine.adopt): each raises, closes every fd it
  was given (it owns them from the call on) and resets the two peers.
- `sigpipe engine|twin`: with SIGPIPE at its default (the process dies of it), the real relay
  splices a client's stream into an upstream that half-closed and then reset (so the socket
  answers EPIPE, which raises SIGPIPE where a send has no MSG_NOSIGNAL: splice has none).
  The process must live on, and the relay serve the next connection.
- `pipes engine|twin`: 6 streams from the backend to clients that do not read, through the
  real relay with a pipe budget of 2 MiB: the relay's pipes (each stream's splicing
  direction has one) hold at most the budget plus 64 KiB each, and the budget is given
  back when the pairs end.
- `urgent-queued SPLICE_AFTER`: "AAAA", an urgent byte, "CCCC" and the FIN all queued on the
  client's socket before the engine reads it (the engine driven by hand): the first read
  stops at the urgent mark with the FIN already reported, which must not end the direction.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyproxy.dataplane import engine
from pyproxy.dataplane.poller import IN, Poller
from pyproxy.dataplane.relay import RelayConfig, TcpRelay
from pyproxy.dataplane.splice import FastRelay
from pyproxy.dataplane.stats import DataplaneStats
from tests.kernel.move_peer import table_for

LISTEN = ("127.0.0.1", 7000)
LIVE = ("127.0.0.1", 9000)  # an echo backend
DEAD = ("127.0.0.1", 9001)  # a backend whose accept queue stays full: its SYNs are dropped


def full_listener(address: tuple[str, int]) -> tuple[socket.socket, socket.socket]:
    """A listener with a backlog of 0 and one connection waiting in it: the kernel drops the
    SYNs that come next (the connecting side retransmits after 1 s). Returns both."""
    server = socket.create_server(address, backlog=0)
    filler = socket.create_connection(address, timeout=2)
    return server, filler


def echo(server: socket.socket) -> None:
    """Accept and echo, a thread per connection, until the process ends."""
    while True:
        conn, _ = server.accept()

        def serve(c: socket.socket) -> None:
            with c:
                try:
                    while data := c.recv(65536):
                        c.sendall(data)
                except OSError:
                    pass
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def make_engine(decide: Callable[..., Any], redial: Callable[..., Any], dial_timeouts: tuple[float, ...],
                **callbacks: Callable[..., Any]) -> Any:
    nothing: Callable[..., None] = lambda *a: None  # noqa: E731
    eng = engine.native.Engine(decide, redial, callbacks.get("closed", nothing), callbacks.get("moved", nothing),
                               callbacks.get("note", nothing), dial_timeouts=dial_timeouts, splice_after=-1,
                               bulk_read=16 * 1024, copy_after=4, pipe_size=1 << 16)
    return eng


def run_until(eng: Any, done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        eng.run(20)
    return done()


def echo_hello(eng: Any, client: socket.socket, seconds: float) -> bytes:
    """Send b"hello" through the engine on `client` and run the engine until it is echoed
    whole, or for `seconds`; what came back."""
    client.sendall(b"hello")
    client.setblocking(False)
    got = bytearray()

    def echoed() -> bool:
        try:
            got.extend(client.recv(100))
        except BlockingIOError:
            pass
        return bytes(got) == b"hello"

    run_until(eng, echoed, seconds)
    return bytes(got)


def stale_redial() -> dict[str, object]:
    live, live_filler = full_listener(LIVE)
    dead, dead_filler = full_listener(DEAD)
    listener = socket.create_server(LISTEN)
    listener.setblocking(False)
    decided: list[tuple[object, ...]] = []
    redials: list[int] = []

    def decide(*args: object) -> tuple[str, int, bool, None]:
        decided.append(args)
        return LIVE[0], LIVE[1], False, None

    def redial(ctx: object, cip: str, cport: int, dip: str, dport: int, failed: list[tuple[str, int]],
               err: int, attempt: int) -> tuple[str, int, bool, None]:
        redials.append(attempt)
        return (DEAD if attempt == 1 else LIVE)[0], (DEAD if attempt == 1 else LIVE)[1], False, None

    # attempt 1 (LIVE, its SYN dropped) has 50 ms; attempt 2 (DEAD) 300 ms; attempt 3 (LIVE) 2 s
    eng = make_engine(decide, redial, (0.05, 0.3, 2.0))
    eng.add_listener(listener.fileno())
    client = socket.create_connection(LISTEN, timeout=5)
    if not run_until(eng, lambda: bool(decided), 2.0):
        return {"error": "never accepted"}
    # LIVE's first SYN was dropped; make room for its retransmission (1 s later), and let it
    # complete while the engine does not run: its deadline (50 ms) and its connect's
    # completion are then both waiting, the deadline first
    live_filler.close()
    live.accept()[0].close()
    time.sleep(1.5)
    eng.run(0)
    threading.Thread(target=echo, args=(live,), daemon=True).start()
    got = echo_hello(eng, client, 4.0)
    eng.close()
    for sock in (client, listener, dead, dead_filler):
        sock.close()
    return {"redials": redials, "echo": got.decode()}


async def stale_poller_async() -> dict[str, object]:
    poller = Poller(asyncio.get_running_loop())
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    calls: list[str] = []
    fresh: list[socket.socket] = []
    reused = second.fileno()

    def on_first(bits: int) -> None:  # closes `second`; its fd number goes to a new, idle socket
        first.recv(1)
        calls.append("first")
        if fresh:
            return
        poller.forget(second.fileno())
        second.close()
        new, new_peer = socket.socketpair()
        fresh.extend((new, new_peer))
        calls.append(f"reused {new.fileno() == reused}")
        if new.fileno() == reused:
            poller.watch(new.fileno(), IN, lambda bits: calls.append(f"new {bits}"))

    poller.watch(first.fileno(), IN, on_first)
    poller.watch(second.fileno(), IN, lambda bits: calls.append("second"))
    first_peer.send(b"x")
    second_peer.send(b"x")  # both readable, `first` first: one batch
    await asyncio.sleep(0.2)
    poller.close()
    for sock in (first, first_peer, second_peer, *fresh):
        sock.close()
    return {"calls": calls}


def stale_poller() -> dict[str, object]:
    return asyncio.run(stale_poller_async())


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def limit_leaving(room: int) -> int:
    """The lowest RLIMIT_NOFILE under which exactly `room` fd numbers are free."""
    taken = open_fds()
    free, limit = 0, 0
    while free < room:
        free += limit not in taken
        limit += 1
    return limit


def relay_for(kind: str, listen: tuple[str, int], splice_after: int = 64 * 1024) -> TcpRelay:
    table = table_for(listen, LIVE)
    if kind == "engine":
        return engine.NativeRelay(table, lambda ip: False, DataplaneStats(), RelayConfig(), splice_after=splice_after)
    return FastRelay(table, lambda ip: False, DataplaneStats(), RelayConfig(), splice_after=splice_after)


def exchange(sock: socket.socket, data: bytes) -> str:
    try:
        sock.sendall(data)
        return sock.recv(100).decode()
    except OSError as err:
        return type(err).__name__


def bulk_echo(sock: socket.socket, size: int) -> None:
    sender = threading.Thread(target=sock.sendall, args=(b"x" * size,), daemon=True)
    sender.start()
    got = 0
    while got < size:
        got += len(sock.recv(1 << 20))
    sender.join(5)


async def exchange_all(clients: list[socket.socket], data: bytes) -> list[str]:
    return list(await asyncio.gather(*(asyncio.to_thread(exchange, c, data) for c in clients)))


async def detach_emfile_async(kind: str) -> dict[str, object]:
    backend = socket.create_server(LIVE)
    threading.Thread(target=echo, args=(backend,), daemon=True).start()
    relay = relay_for(kind, LISTEN)
    await relay.start(*LISTEN)
    # the first pair splices both ways (6 fds to hand out), the 7 after it copy (2 fds): the
    # engine hands out the newest first, so a copying pair has left when the splicing one fails
    clients = [await asyncio.to_thread(socket.create_connection, LISTEN, 5)]
    await asyncio.to_thread(bulk_echo, clients[0], 1 << 20)
    clients += [await asyncio.to_thread(socket.create_connection, LISTEN, 5) for _ in range(7)]
    before = await exchange_all(clients, b"before")
    fds = len(open_fds())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(5), hard))
    try:
        await relay.detach_pairs()
        failed = "no error"
    except OSError as err:
        failed = errno.errorcode.get(err.errno or 0, str(err))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fds_after = len(open_fds())
    after = await exchange_all(clients, b"after")
    moved = await relay.detach_pairs()
    for _, dups in moved:
        for fd in dups:
            os.close(fd)
    for client in clients:
        client.close()
    await relay.drain(0.5)
    return {"before": before, "failed": failed, "fd_change": fds_after - fds, "after": after, "moved": len(moved)}


def detach_emfile(kind: str) -> dict[str, object]:
    return asyncio.run(detach_emfile_async(kind))


def dial_bound() -> dict[str, object]:
    listener = socket.create_server(LISTEN)
    listener.setblocking(False)
    redials: list[int] = []

    def decide(*args: object) -> tuple[str, int, bool, None]:
        return DEAD[0], DEAD[1], False, None  # nothing listens there: refused

    def redial(*args: Any) -> tuple[str, int, bool, None] | None:
        redials.append(args[-1])
        return None if len(redials) >= 100 else (DEAD[0], DEAD[1], False, None)  # keeps asking, up to 100

    eng = make_engine(decide, redial, (1.0, 1.0))
    eng.add_listener(listener.fileno())
    client = socket.create_connection(LISTEN, timeout=5)
    client.setblocking(False)
    end = ["none"]

    def ended() -> bool:
        if end[0] != "none":
            return True
        try:
            end[0] = "eof" if client.recv(100) == b"" else "data"
        except BlockingIOError:
            return False
        except OSError as err:
            end[0] = type(err).__name__
        return True

    run_until(eng, ended, 5.0)
    eng.close()
    client.close()
    listener.close()
    return {"redials": redials, "client": end[0]}


REENTRY: dict[str, Callable[[Any], object]] = {  # harmless calls first: close() last
    "ids": lambda eng: eng.ids(),
    "connections": lambda eng: eng.connections(),
    "sweep": lambda eng: eng.sweep(1e9, 1e9),
    "flush": lambda eng: eng.flush(),
    "run": lambda eng: eng.run(0),
    "detach": lambda eng: eng.detach(),
    "close_pair": lambda eng: eng.close_pair(0, True),
    "close_all": lambda eng: eng.close_all(True),
    "close": lambda eng: eng.close(),
}


def reenter() -> dict[str, object]:
    backend = socket.create_server(LIVE)
    threading.Thread(target=echo, args=(backend,), daemon=True).start()
    listener = socket.create_server(LISTEN)
    listener.setblocking(False)
    seen: dict[str, dict[str, str]] = {"decide": {}, "closed": {}}
    box: list[Any] = []

    def try_all(where: str) -> None:
        if seen[where]:
            return
        for name, call in REENTRY.items():
            try:
                call(box[0])
                seen[where][name] = "ok"
            except RuntimeError:
                seen[where][name] = "RuntimeError"

    def decide(*args: object) -> tuple[str, int, bool, None]:
        try_all("decide")
        return LIVE[0], LIVE[1], False, None

    def closed(*args: object) -> None:
        try_all("closed")

    box.append(make_engine(decide, lambda *a: None, (2.0,), closed=closed))
    eng = box[0]
    eng.add_listener(listener.fileno())
    echoes = []
    for _ in range(2):  # the second connection: the engine still serves
        client = socket.create_connection(LISTEN, timeout=5)
        echoes.append(echo_hello(eng, client, 3.0).decode())
        client.close()
        run_until(eng, lambda: eng.count == 0, 3.0)
    eng.close()
    listener.close()
    return {"echoes": echoes, **seen}


def tcp_pair(server: socket.socket) -> tuple[socket.socket, int]:
    """A connected peer and the fd of its accepted end (the relay's to own)."""
    peer = socket.create_connection(server.getsockname(), timeout=2)
    accepted, _ = server.accept()
    return peer, accepted.detach()


def peer_end(peer: socket.socket) -> str:
    try:
        return "eof" if peer.recv(10) == b"" else "data"
    except OSError as err:
        return type(err).__name__
    finally:
        peer.close()


async def adopt_errors_async(kind: str) -> dict[str, object]:
    from pyproxy.dataplane.connstate import DirectionState, TcpState
    server = socket.create_server(("127.0.0.1", 0))
    started = relay_for(kind, LISTEN)
    await started.start(*LISTEN)
    port = table_for(LISTEN, LIVE).routes[(LISTEN[0], "TCP", LISTEN[1])].port.name
    state = TcpState(port, ("127.0.0.1", 40000), LISTEN, LIVE, age=0.0, idle=0.0)
    seen: dict[str, object] = {}

    async def provoke(name: str, relay: TcpRelay, bad: TcpState, first_is_pipe: bool = False) -> None:
        peers, fds = [], []
        spare = None
        if first_is_pipe:
            read_end, spare = os.pipe()
            fds.append(read_end)
        for _ in range(2 - len(fds)):
            peer, fd = tcp_pair(server)
            peers.append(peer)
            fds.append(fd)
        before = len(open_fds())
        try:
            await relay.adopt_pair(bad, fds)
            error = "none"
        except Exception as err:
            error = type(err).__name__
        closed = before - len(open_fds())
        if spare is not None:
            os.close(spare)
        seen[name] = {"error": error, "closed": closed, "peers": [peer_end(p) for p in peers]}

    await provoke("pipe-not-brought", started, replace(state, up=DirectionState(pipe=True, in_pipe=0)))
    await provoke("pipe-as-socket", started, state, first_is_pipe=True)
    await provoke("not-started", relay_for(kind, ("127.0.0.1", 7999)), state)
    if kind == "engine":
        assert isinstance(started, engine.NativeRelay)
        peers, fds = [], []
        for _ in range(2):
            peer, fd = tcp_pair(server)
            peers.append(peer)
            fds.append(fd)
        before = len(open_fds())
        try:
            started.engine.adopt(None, fds, state.client, state.frontend, state.endpoint, 0.0, 0.0, 0, 0,
                                 (False, False, b"", False), (False, False, b"", False, 0))
            error = "none"
        except Exception as err:
            error = type(err).__name__
        seen["malformed-direction"] = {"error": error, "closed": before - len(open_fds()),
                                       "peers": [peer_end(p) for p in peers]}
    await started.drain(0.5)
    server.close()
    return seen


def adopt_errors(kind: str) -> dict[str, object]:
    return asyncio.run(adopt_errors_async(kind))


def half_close_then_reset(server: socket.socket, rounds: int) -> None:
    """Each connection: FIN at once, read a little, then a reset (unread data left)."""
    for _ in range(rounds):
        conn, _ = server.accept()
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1000)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()


def stream_until_cut(seconds: float) -> str:
    try:
        with socket.create_connection(LISTEN, timeout=seconds) as client:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:  # MSG_NOSIGNAL: this process has SIGPIPE at its default
                client.send(b"x" * 65536, socket.MSG_NOSIGNAL)
    except OSError as err:
        return type(err).__name__
    return "not cut"


async def sigpipe_async(kind: str) -> dict[str, object]:
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    backend = socket.create_server(LIVE)
    rounds = 5
    threading.Thread(target=half_close_then_reset, args=(backend, rounds), daemon=True).start()
    relay = relay_for(kind, LISTEN, splice_after=0)  # splice from the first byte
    await relay.start(*LISTEN)
    cuts = [await asyncio.to_thread(stream_until_cut, 3.0) for _ in range(rounds)]
    await relay.drain(0.5)
    return {"alive": True, "cuts": cuts}


def sigpipe(kind: str) -> dict[str, object]:
    return asyncio.run(sigpipe_async(kind))


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the reset that ends the case


def pour(server: socket.socket, count: int, size: int) -> None:
    """Send `size` bytes down each of `count` connections, a thread each (they block: nobody reads)."""
    for _ in range(count):
        conn, _ = server.accept()
        threading.Thread(target=send_quietly, args=(conn, b"x" * size), daemon=True).start()


def pipes_held() -> dict[str, int]:
    """The pipes of this process (read ends): how many, their capacity, the bytes in them."""
    import fcntl
    import termios
    count = capacity = held = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                continue
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                continue
            capacity += fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ
            held += int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
            count += 1
        except OSError:
            continue
    return {"pipes": count, "capacity": capacity, "held": held}


async def pipes_async(kind: str) -> dict[str, object]:
    from pyproxy.dataplane import splice
    budget = 2 << 20
    engine.PIPE_BUDGET = splice.PIPE_BUDGET = budget
    streams = 6
    backend = socket.create_server(LIVE)
    threading.Thread(target=pour, args=(backend, streams, 32 << 20), daemon=True).start()
    relay = relay_for(kind, LISTEN)
    await relay.start(*LISTEN)
    clients = [await asyncio.to_thread(socket.create_connection, LISTEN, 5) for _ in range(streams)]
    await asyncio.sleep(2.0)  # every stream's pipe fills behind its client's full buffers
    held = pipes_held()

    def grown() -> int:
        holder = relay.engine if isinstance(relay, engine.NativeRelay) else relay
        return int(getattr(holder, "pipe_grown", -1))

    grown_while_open = grown()
    for client in clients:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()
    for _ in range(100):
        if not relay.pairs:
            break
        await asyncio.sleep(0.02)
    left = grown()
    await relay.drain(0.5)
    bound = budget + streams * 64 * 1024
    return {**held, "bound": bound, "within": held["capacity"] <= bound and held["held"] <= bound,
            "grown_within_budget": 0 < grown_while_open <= budget, "grown_after": left}


def pipes(kind: str) -> dict[str, object]:
    return asyncio.run(pipes_async(kind))


def urgent_queued(splice_after: str) -> dict[str, object]:
    backend = socket.create_server(LIVE)
    listener = socket.create_server(LISTEN)
    listener.setblocking(False)
    eng = engine.native.Engine(lambda *a: (LIVE[0], LIVE[1], False, None), lambda *a: None, lambda *a: None,
                               lambda *a: None, lambda *a: None, dial_timeouts=(2.0,),
                               splice_after=int(splice_after), bulk_read=16 * 1024, copy_after=4, pipe_size=1 << 16)
    eng.add_listener(listener.fileno())
    client = socket.create_connection(LISTEN, timeout=5)
    backend.settimeout(0.02)
    upstream = None
    for _ in range(100):  # accept and dial
        eng.run(20)
        try:
            upstream, _ = backend.accept()
            break
        except TimeoutError:
            continue
    if upstream is None:
        return {"error": "never dialed"}
    for _ in range(5):
        eng.run(10)  # the connect's completion
    client.sendall(b"AAAA")
    client.send(b"!", socket.MSG_OOB)
    client.sendall(b"CCCC")
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.2)  # all of it has landed before the engine looks
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    upstream.setblocking(False)
    got = bytearray()
    end = ["none"]

    def ended() -> bool:
        try:
            chunk = upstream.recv(100)
        except BlockingIOError:
            return False
        except OSError as err:
            end[0] = type(err).__name__
            return True
        got.extend(chunk)
        if not chunk:
            end[0] = "eof"
        return not chunk

    run_until(eng, ended, 3.0)
    eng.close()
    for sock in (client, upstream, listener, backend):
        sock.close()
    return {"got": bytes(got).decode(), "end": end[0]}


CASES: dict[str, Callable[..., dict[str, object]]] = {
    "urgent-queued": urgent_queued,
    "pipes": pipes,
    "sigpipe": sigpipe,
    "adopt-errors": adopt_errors,
    "reenter": reenter,
    "dial-bound": dial_bound,
    "stale-redial": stale_redial, "stale-poller": stale_poller, "detach-emfile": detach_emfile,
}


if __name__ == "__main__":
    if not engine.AVAILABLE:
        print(json.dumps({"error": "the compiled engine is not built"}))
        sys.exit(1)
    print(json.dumps(CASES[sys.argv[1]](*sys.argv[2:])), flush=True)
