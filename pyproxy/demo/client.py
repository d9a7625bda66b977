"""The demo's and tests' client, run inside a client, node or pod namespace.

Each subcommand prints one line per result, so callers can count and compare:
- `http ADDR [--count N] [--interval S]`: GET /, print the echo pod's body line;
- `who ADDR [--count N]`: the echo pod's `pod=... client=...` line;
- `echo ADDR --bytes N [--rate B]`: stream N pseudo-random bytes (at most B bytes/s if
  given) while reading them back, half-close, and print `sent=N received=M
  match=True|False` (sha256 of both directions);
- `sink ADDR --bytes N`: send N bytes, half-close, print whether the pod counted the
  same bytes and sha256;
- `turns ADDR --bytes N --count K`: ECHO in K turns of N bytes each, a turn's bytes all sent
  before its echo is read whole, with no EOF between turns; print `turns=D/K` (D: the turns
  that came back whole). A relay that leaves a burst's last bytes unread stalls here;
- `urgent ADDR --bytes N`: ECHO with N bytes, one urgent byte (`MSG_OOB`), N bytes, then a
  half-close; read back to the EOF (SO_OOBINLINE) and print `received=M whole=True|False
  urgent=inband|dropped end=eof|<error>` (whole: every byte but the urgent one came back in
  order; a relay may pass the urgent byte in band or drop it);

- `connect ADDR`: print `ok|refused|timeout|reset <ms>`;
- `stall ADDR --bytes N --timeout S`: ECHO without ever reading; print how much got out
  before sending stayed blocked for S seconds (backpressure checks);
- `hold ADDR`: open a connection, print the pod's line, then send each stdin line and print
  its echo (for drain and endpoint-removal checks);
- `udp ADDR [--size N] [--count N]`: send datagrams, print the pod's header line and
  whether the payload came back whole (`whole=True`).
- `storm ADDR --count N [--batch B] [--send]`: N connections, B at a time, each reset
  (SO_LINGER 0) as soon as its handshake completes (after sending `WHO` with `--send`);
  print one line `storm connected=C failed=F` (hostile tests).
- `silent ADDR --count N --hold S [--send]`: open N connections that send nothing (or
  `WHO` and a half-close with `--send`) and never read, hold them S seconds, then close;
  print `silent opened=O closed_by_peer=P`.
- `loop ADDR --duration S [--udp] [--stop-file F]`: new connections (`WHO`), or UDP
  exchanges, one after another for up to S seconds (or until F exists); print one JSON
  line: ok, failed, the first failures, the slowest attempt, the longest time between two
  answers (`gap_ms`: time without service), and the answering pods (restart tests).
Every operation has a timeout; nothing here loops without a bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

CHUNK = 1 << 16


def _address(text: str) -> tuple[str, int]:
    """`ip:port`, or `[ipv6]:port`."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _family(address: tuple[str, int]) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def _connect(address: tuple[str, int], timeout: float, bind: str | None) -> socket.socket:
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if bind:
        sock.bind((bind, 0))
    sock.connect(address)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def http(address: tuple[str, int], timeout: float, bind: str | None) -> str:
    with _connect(address, timeout, bind) as sock:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{address[1]}\r\n\r\n".encode())
        reply = _read_all(sock).decode(errors="replace")
    return reply.partition("\r\n\r\n")[2].strip()


def who(address: tuple[str, int], timeout: float, bind: str | None) -> str:
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"WHO\n")
        return _read_all(sock).decode(errors="replace").strip()


def _send_random(sock: socket.socket, size: int, digest: hashlib._Hash, rate: float = 0.0) -> None:
    """Send `size` pseudo-random bytes (at most `rate` bytes/s if given), feeding each chunk to `digest` too."""
    remaining = size
    start = time.monotonic()
    while remaining > 0:
        chunk = os.urandom(min(CHUNK, remaining))
        digest.update(chunk)
        sock.sendall(chunk)
        remaining -= len(chunk)
        if rate > 0:
            ahead = (size - remaining) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def echo(address: tuple[str, int], size: int, timeout: float, bind: str | None, rate: float = 0.0) -> str:
    sent_digest, received_digest = hashlib.sha256(), hashlib.sha256()
    received = 0
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"ECHO\n")

        def reader() -> None:
            nonlocal received
            while chunk := sock.recv(CHUNK):
                received_digest.update(chunk)
                received += len(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        _send_random(sock, size, sent_digest, rate)
        sock.shutdown(socket.SHUT_WR)
        thread.join(timeout)
    match = received == size and sent_digest.digest() == received_digest.digest()
    return f"sent={size} received={received} match={match}"


def urgent(address: tuple[str, int], size: int, timeout: float, bind: str | None) -> str:
    part_a, part_c = os.urandom(size), os.urandom(size)
    got = bytearray()
    end = "timeout"
    with _connect(address, timeout, bind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        sock.sendall(b"ECHO\n")

        def send() -> None:
            sock.sendall(part_a)  # no pause: the urgent byte, the rest and the FIN may land together
            sock.send(b"!", socket.MSG_OOB)
            sock.sendall(part_c)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for _ in range(1 << 16):
                chunk = sock.recv(CHUNK)
                if not chunk:
                    end = "eof"
                    break
                got += chunk
        except OSError as err:
            end = type(err).__name__
        sender.join(timeout)
    inband = bytes(got) == part_a + b"!" + part_c
    whole = inband or bytes(got) == part_a + part_c
    return f"received={len(got)} whole={whole} urgent={'inband' if inband else 'dropped'} end={end}"


def turns(address: tuple[str, int], size: int, count: int, timeout: float, bind: str | None) -> str:
    done = 0
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"ECHO\n")
        for _ in range(min(count, 1000)):
            message = os.urandom(size)
            sender = threading.Thread(target=sock.sendall, args=(message,), daemon=True)
            sender.start()  # sent while its echo is read, so neither side's buffers need to hold it all
            parts, received = [], 0
            while received < size:
                chunk = sock.recv(min(CHUNK, size - received))  # a stall ends in the socket's timeout
                if not chunk:
                    break
                parts.append(chunk)
                received += len(chunk)
            sender.join(timeout)
            if b"".join(parts) != message:
                break
            done += 1
    return f"turns={done}/{count}"


def sink(address: tuple[str, int], size: int, timeout: float, bind: str | None) -> str:
    digest = hashlib.sha256()
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"SINK\n")
        _send_random(sock, size, digest)
        sock.shutdown(socket.SHUT_WR)  # the pod answers only after it sees our EOF
        reply = _read_all(sock).decode().split()
    match = reply == [str(size), digest.hexdigest()]
    return f"sent={size} match={match} reply={' '.join(reply)}"


def connect(address: tuple[str, int], timeout: float, bind: str | None) -> str:
    started = time.monotonic()
    try:
        with _connect(address, timeout, bind) as sock:
            sock.sendall(b"WHO\n")
            data = sock.recv(CHUNK)
            outcome = "ok" if data else "closed"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except (socket.timeout, TimeoutError):
        outcome = "timeout"
    except OSError as err:
        outcome = f"error:{err.errno}"
    return f"{outcome} {(time.monotonic() - started) * 1000:.1f}"


def udp(address: tuple[str, int], size: int, timeout: float, bind: str | None) -> str:
    payload = os.urandom(size)
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if bind:
            sock.bind((bind, 0))
        sock.connect(address)  # a connected socket only accepts replies from the service address
        sock.send(payload)
        try:
            reply = sock.recv(1 << 17)
        except (socket.timeout, TimeoutError):
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
    head, _, body = reply.partition(b"\n")
    return f"{head.decode(errors='replace')} whole={body == payload}"


def stall(address: tuple[str, int], size: int, timeout: float, bind: str | None) -> str:
    """ECHO, but never read: send until `size` bytes are out or sending has been blocked for
    `timeout` seconds. What got out measures the buffering along the path."""
    sent = 0
    chunk = os.urandom(CHUNK)
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"ECHO\n")
        sock.setblocking(False)
        blocked_since = time.monotonic()
        while sent < size and time.monotonic() - blocked_since < timeout:
            try:
                sent += sock.send(chunk[: size - sent])
                blocked_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
    return f"sent={sent} stalled={sent < size}"


def hold(address: tuple[str, int], timeout: float, bind: str | None) -> str:
    """Open a HOLD connection, print the pod's line, then echo each stdin line through it."""
    with _connect(address, timeout, bind) as sock:
        sock.sendall(b"HOLD\n")
        print(sock.recv(CHUNK).decode(errors="replace").strip(), flush=True)
        for line in sys.stdin:
            sock.sendall(line.encode())
            try:
                print("echo " + sock.recv(CHUNK).decode(errors="replace").strip(), flush=True)
            except OSError as err:
                print(f"error {type(err).__name__}", flush=True)
                return "closed"
    return "closed"


LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close() sends RST


def _open_batch(address: tuple[str, int], n: int, bind: str | None) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
        sock.setblocking(False)
        if bind:
            sock.bind((bind, 0))
        sock.connect_ex(address)
        socks.append(sock)
    return socks


def _wait_connected(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets whose handshake completed within `timeout`."""
    import select

    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    done: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            sock = by_fd.pop(fd, None)
            if sock is None:
                continue
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(sock)
    return done


def storm(address: tuple[str, int], count: int, batch: int, send: bool, timeout: float, bind: str | None) -> str:
    connected = failed = 0
    for start in range(0, min(count, 100000), batch):
        socks = _open_batch(address, min(batch, count - start), bind)
        try:
            ok = _wait_connected(socks, timeout)
            connected += len(ok)
            failed += len(socks) - len(ok)
            for sock in ok:
                if send:
                    try:
                        sock.send(b"WHO\n")
                    except OSError:
                        pass
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        finally:
            for sock in socks:
                sock.close()
    return f"storm connected={connected} failed={failed}"


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed (EOF after any unread reply, or a reset); never blocks."""
    for _ in range(64):
        try:
            if not sock.recv(CHUNK, socket.MSG_DONTWAIT):
                return True
        except BlockingIOError:
            return False
        except OSError:
            return True
    return False


def silent(address: tuple[str, int], count: int, hold_for: float, send: bool, timeout: float,
           bind: str | None) -> str:
    socks = _open_batch(address, min(count, 20000), bind)
    try:
        ok = _wait_connected(socks, timeout)
        for sock in ok:
            if send:
                try:
                    sock.send(b"WHO\n")
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        print(f"opened {len(ok)}", flush=True)
        time.sleep(min(hold_for, 600))
        closed = sum(_closed_by_peer(sock) for sock in ok)
        return f"silent opened={len(ok)} closed_by_peer={closed}"
    finally:
        for sock in socks:
            sock.close()


def loop(address: tuple[str, int], duration: float, interval: float, timeout: float, use_udp: bool,
         stop_file: str | None, bind: str | None, reply_timeout: float) -> str:
    """Attempts back to back until `duration` passes (at most 600 s) or `stop_file` exists.
    TCP: the handshake has `timeout`, the answer `reply_timeout`; `blackhole_ms` is the
    longest run of handshakes that did not complete (from the first such attempt to the
    next completed handshake: SYNs dropped), `gap_ms` the longest time between two answers
    (time without service)."""
    started = time.monotonic()
    ok = failed = 0
    failures: list[str] = []
    pods: dict[str, int] = {}
    slowest = gap = blackhole = 0.0
    last_answer = started
    unconnected_since: float | None = None
    while time.monotonic() - started < min(duration, 600.0) and not (stop_file and os.path.exists(stop_file)):
        attempt = time.monotonic()
        try:
            if use_udp:
                line = udp(address, 64, timeout, bind)
            else:
                try:
                    sock = _connect(address, timeout, bind)
                except OSError:
                    unconnected_since = attempt if unconnected_since is None else unconnected_since
                    raise
                if unconnected_since is not None:
                    blackhole = max(blackhole, time.monotonic() - unconnected_since)
                    unconnected_since = None
                with sock:
                    sock.settimeout(reply_timeout)
                    sock.sendall(b"WHO\n")
                    line = _read_all(sock).decode(errors="replace").strip()
            good = line.startswith("pod=") and (not use_udp or line.endswith("whole=True"))
        except OSError as err:
            line, good = f"{type(err).__name__}: {err}", False
        now = time.monotonic()
        if good:
            ok += 1
            pod = line.split()[0].removeprefix("pod=")
            pods[pod] = pods.get(pod, 0) + 1
            slowest = max(slowest, now - attempt)
            gap = max(gap, now - last_answer)
            last_answer = now
        else:
            failed += 1
            if len(failures) < 20:
                failures.append(f"{now - started:.3f}s {line}")
        if interval:
            time.sleep(interval)
    gap = max(gap, time.monotonic() - last_answer - interval)
    return json.dumps({"ok": ok, "failed": failed, "failures": failures, "slowest_ms": round(slowest * 1000, 1),
                       "gap_ms": round(gap * 1000, 1), "blackhole_ms": round(blackhole * 1000, 1),
                       "pods": pods})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyproxy-client")
    parser.add_argument("mode", choices=["http", "who", "echo", "sink", "turns", "connect", "udp", "hold", "stall",
                                           "storm", "silent", "loop", "urgent"])
    parser.add_argument("address")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--rate", type=float, default=0.0, help="echo: bytes per second at most")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--bind", help="source address to bind")
    parser.add_argument("--batch", type=int, default=200, help="storm: connections at a time")
    parser.add_argument("--hold", type=float, default=1.0, help="silent: seconds to hold the connections")
    parser.add_argument("--send", action="store_true", help="storm: send WHO first; silent: WHO and half-close")
    parser.add_argument("--duration", type=float, default=10.0, help="loop: seconds (at most 600)")
    parser.add_argument("--udp", action="store_true", help="loop: UDP exchanges instead of TCP connections")
    parser.add_argument("--stop-file", help="loop: stop once this file exists")
    parser.add_argument("--reply-timeout", type=float, help="loop: seconds for a TCP answer (default --timeout)")
    args = parser.parse_args(argv)
    address = _address(args.address)
    if args.mode == "loop":
        print(loop(address, args.duration, args.interval, args.timeout, args.udp, args.stop_file, args.bind,
                   args.reply_timeout or args.timeout), flush=True)
        return 0
    if args.mode == "storm":
        print(storm(address, args.count, max(1, args.batch), args.send, args.timeout, args.bind), flush=True)
        return 0
    if args.mode == "turns":
        try:
            print(turns(address, args.bytes, args.count, args.timeout, args.bind), flush=True)
        except OSError as err:
            print(f"error {type(err).__name__}: {err}", flush=True)
        return 0
    if args.mode == "silent":
        print(silent(address, args.count, args.hold, args.send, args.timeout, args.bind), flush=True)
        return 0
    for i in range(min(args.count, 100000)):
        if i and args.interval:
            time.sleep(args.interval)
        try:
            if args.mode == "http":
                line = http(address, args.timeout, args.bind)
            elif args.mode == "who":
                line = who(address, args.timeout, args.bind)
            elif args.mode == "echo":
                line = echo(address, args.bytes, args.timeout, args.bind, args.rate)
            elif args.mode == "sink":
                line = sink(address, args.bytes, args.timeout, args.bind)
            elif args.mode == "urgent":
                line = urgent(address, args.bytes, args.timeout, args.bind)
            elif args.mode == "stall":
                line = stall(address, args.bytes, args.timeout, args.bind)
            elif args.mode == "hold":
                line = hold(address, args.timeout, args.bind)
            elif args.mode == "udp":
                line = udp(address, args.size, args.timeout, args.bind)
            else:
                line = connect(address, args.timeout, args.bind)
        except OSError as err:
            line = f"error {type(err).__name__}: {err}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
