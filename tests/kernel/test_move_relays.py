"""Open connections move between relay processes on the real kernel (no proxy around them).

Each relay runs in its own process (tests/kernel/move_peer.py) in one namespace of its
own; a hand-over sends every connection's fds with SCM_RIGHTS and its state as JSON over
the hand-over channel, as pyproxy's does. Streams crossing two hand-overs run here for
each relay and loop (the whole-proxy test in test_relay.py covers the kernel tier's two
variants), crossing from the engine to its twin and back; and the cases that test does
not reach with its configuration: an idle timer carried over (a 3 s idle bound), a
successor that adopts nothing (the old process keeps and drains its connections), and a
pair moved while its client does not read (its bytes move in the pipe).
"""

from __future__ import annotations

import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from pyproxy.demo.lab import Lab
from tests.conftest import privileged_reason, skip_or_fail
from tests.kernel.moving import stream_code

pytestmark = pytest.mark.privileged

ENDPOINT = "127.0.0.2:9000"
VARIANTS = {
    "engine": ("--relay", "engine", "--loop", "uvloop"),
    "twin-uvloop": ("--relay", "twin", "--loop", "uvloop"),
    "twin-asyncio": ("--relay", "twin", "--loop", "asyncio"),
}


class Box:
    """One namespace with an echo endpoint and relay processes."""

    def __init__(self, lab: Lab, workdir: Path, variant: tuple[str, ...]) -> None:
        self.lab, self.workdir, self.variant = lab, workdir, variant
        self.peers = 0
        self.streams: list[IO[Any]] = []  # closed with the box

    def spawn(self, args: list[str], stdin: bool = False) -> subprocess.Popen[str]:
        """A process in the box whose lines the test reads (and, with `stdin`, writes)."""
        with open(self.workdir / f"stderr{len(self.lab.processes)}.log", "w") as err:
            proc = subprocess.Popen(["ip", "netns", "exec", self.lab.ns("box"), sys.executable, *args],
                                    stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE, stderr=err,
                                    text=True)
        self.lab.processes.append(proc)
        self.streams += [s for s in (proc.stdin, proc.stdout) if s is not None]
        return proc

    def close(self) -> None:
        self.lab.close()
        for stream in self.streams:
            try:
                stream.close()
            except OSError:  # a pipe whose reader is gone
                pass

    def peer(self, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
        """A relay process; returns it, its listen address and its inbox path."""
        self.peers += 1
        listen = f"127.0.0.1:{7000 + self.peers}"
        inbox = str(self.workdir / f"inbox{self.peers}.sock")
        proc = self.spawn(["-m", "tests.kernel.move_peer", *self.variant, "--listen", listen, "--endpoint", ENDPOINT,
                           "--inbox", inbox, *extra], stdin=True)
        assert expect(proc, "ready") == "ready"
        return proc, listen, inbox

    def client(self, *args: str) -> subprocess.Popen[str]:
        return self.spawn(["-m", "pyproxy.demo.client", *args])


def expect(proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
    """The next line `proc` prints that starts with `prefix` (bounded)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no '{prefix}' line from the process (exit code {proc.poll()})")


def say(proc: subprocess.Popen[str], line: str) -> None:
    stdin: IO[Any] | None = proc.stdin
    assert stdin is not None
    stdin.write(line + "\n")
    stdin.flush()


@pytest.fixture(scope="module", params=list(VARIANTS))
def box(request: pytest.FixtureRequest) -> Iterator[Box]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-move-"))
    box = Box(Lab(), workdir, VARIANTS[request.param])
    try:
        box.lab.add_ns("box")
        host, port = ENDPOINT.split(":")
        echo = box.spawn(["-m", "pyproxy.demo.echo", "--name", "pod", "--host", host, "--tcp", port])
        assert expect(echo, "ready") == "ready pod"
        yield box
    finally:
        box.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def test_long_streams_cross_two_handovers_intact(box: Box) -> None:
    """The second hand-over goes to the other relay (an upgrade to a node where the engine
    was not built, or back): the state is one format, pipes included."""
    other = "twin" if "engine" in box.variant else "engine"
    first, listen, _ = box.peer()
    second, _, second_inbox = box.peer()
    third, _, third_inbox = box.peer("--relay", other)
    host, port = listen.split(":")
    streams = [box.spawn(["-c", stream_code(host, int(port))], stdin=True) for _ in range(2)]
    for stream in streams:
        expect(stream, "flowing")
    say(first, f"handover {second_inbox}")
    assert expect(first, "moved") == "moved 2 left 0"
    assert expect(second, "adopted") == "adopted 2"
    time.sleep(0.8)
    say(second, f"handover {third_inbox}")
    assert expect(second, "moved") == "moved 2 left 0"
    assert expect(third, "adopted") == "adopted 2"
    time.sleep(1.5)  # over 16 MB each way in all
    for stream in streams:
        say(stream, "stop")
    for stream in streams:
        assert expect(stream, "stream", timeout=40) == "stream True True True"
    say(third, "count")
    assert expect(third, "pairs") == "pairs 0"


def test_connections_a_successor_does_not_adopt_go_on_in_the_old_process(box: Box) -> None:
    first, listen, _ = box.peer()
    refusing, _, inbox = box.peer("--refuse")
    host, port = listen.split(":")
    stream = box.spawn(["-c", stream_code(host, int(port))], stdin=True)
    expect(stream, "flowing")
    say(first, f"handover {inbox}")
    assert expect(first, "moved") == "moved 1 left 1", "taken back"
    assert expect(refusing, "adopted") == "adopted 1"
    time.sleep(2.5)  # over 16 MB each way in all
    say(stream, "stop")
    assert expect(stream, "stream", timeout=40) == "stream True True True"
    assert expect(first, "drained") == "drained cut=0"


def inline_client(box: Box, listen: str, body: str) -> subprocess.Popen[str]:
    """A client connected to `listen` that runs `body` (it may read lines from the test)."""
    host, port = listen.split(":")
    prelude = ("import socket,hashlib,os,sys,threading,time\ns=socket.socket()\n"
               "s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,65536)\n"
               f"s.settimeout(10)\ns.connect(('{host}',{port}))\n")
    return box.spawn(["-c", prelude + body], stdin=True)


def test_idle_timer_goes_on_where_it_was(box: Box) -> None:
    """Idle bound 3 s; the hand-over comes 1.5 s into the silence: the successor closes the
    connection about 3 s after the last byte, not 3 s after it took it up."""
    first, listen, _ = box.peer("--idle", "3")
    second, _, inbox = box.peer("--idle", "3")
    client = inline_client(box, listen, (
        "s.sendall(b'HOLD\\n'); s.recv(1000); t0=time.monotonic(); print('held',flush=True)\n"
        "try:\n    s.recv(1000)\nexcept OSError:\n    pass\n"
        "print('closed after %.1f' % (time.monotonic()-t0), flush=True)\n"
    ))
    expect(client, "held")
    time.sleep(1.5)
    say(first, f"handover {inbox}")
    assert expect(first, "moved") == "moved 1 left 0"
    assert expect(second, "adopted") == "adopted 1"
    closed_after = float(expect(client, "closed", timeout=10).split()[-1])
    assert 2.8 <= closed_after < 4.0  # without the idle time carried over: 4.5 s


def test_a_pair_whose_client_does_not_read_moves_with_its_bytes(box: Box) -> None:
    """The client does not read while the hand-over runs, so the relay's buffers towards
    it stay full: the pair moves with the bytes its pipe holds, and every byte arrives."""
    first, listen, _ = box.peer()
    second, _, inbox = box.peer()
    client = inline_client(box, listen, (
        "data=os.urandom(8<<20); s.settimeout(30)\n"
        "t=threading.Thread(target=lambda: (s.sendall(b'ECHO\\n'+data), s.shutdown(socket.SHUT_WR)))\n"
        "t.start(); time.sleep(0.5); print('stalled',flush=True)\n"
        "sys.stdin.readline(); got=b''\n"
        "while (c:=s.recv(1<<16)): got+=c\n"
        "print('echoed', got==data, flush=True)\n"
    ))
    expect(client, "stalled")
    time.sleep(0.5)
    say(first, f"handover {inbox}")
    moved = expect(first, "moved")
    expect(second, "adopted")
    say(client, "go")
    assert expect(client, "echoed", timeout=20) == "echoed True"
    assert moved == "moved 1 left 0"
