"""Helpers for the tests of open connections moving to a successor pyproxy (test_relay.py).

`restart` starts a second pyproxy on a node with the same command line while the first
runs, as a DaemonSet rolling update with surge does: the hand-over (pyproxy/lifecycle)
gives it the listeners, then every open connection, and the first one exits. The client
programs print one line the test compares: a stream both ways until told to stop (sha256
of each direction), a half-closed SINK, a UDP flow on a connected socket (which takes
answers from the service address only).
"""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pyproxy.demo.cluster import Cluster
TCP_SVC, UDP_SVC = "10.96.5.1", "10.96.5.2"


def restart(cluster: Cluster, node: str = "node1", workers: int = 1) -> list[str]:
    """Start a successor with the same command line; once every worker took its share up
    and the old process exited, return the old workers' log lines about what they handed over."""
    old = cluster.proxies[node]
    args = [str(a) for a in cast(list[str], old.args)][4:]  # after `ip netns exec NS`
    taken = cluster.log(node).count("took up")
    cluster.proxies[node] = cluster.lab.spawn(node, args, log=cluster.logs[node])
    for seen in range(taken, taken + workers):
        cluster.wait_for_log(node, "took up", seen, timeout=30)
    assert old.wait(30) == 0
    return [str(line) for line in re.findall(r"handing over .*", cluster.log(node))[-workers:]]


class Clients:
    """Client processes whose output the test reads; ended and closed after the test."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.cluster.lab.ns("client"), sys.executable, "-c", code],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            self.cluster.lab.stop(proc, timeout=2)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:  # its reader is gone
                        pass


@pytest.fixture
def clients(cluster: Cluster) -> Iterator[Clients]:
    made = Clients(cluster)
    try:
        yield made
    finally:
        made.close()


def tell(procs: list[subprocess.Popen[str]], line: str) -> None:
    """Send `line` to each process's stdin (one already gone shows up in its output)."""
    for proc in procs:
        assert proc.stdin is not None
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass


def line_of(proc: subprocess.Popen[Any], prefix: str, timeout: float) -> str:
    """The first line `proc` prints starting with `prefix` (bounded); its output is closed after."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        text = proc.stdout.readline() if ready else ""
        if not text:
            break
        seen.append(text)
        if text.startswith(prefix):
            return text.strip()
    raise AssertionError(f"no '{prefix}' line within {timeout}s: {''.join(seen)[-1000:]}")


def stream_code(host: str, port: int, source: str = "") -> str:
    """A stream both ways (ECHO), about 8 MB/s, until a line on stdin and at least 16 MiB sent
    (whichever comes last, at most 30 s after the line): prints `flowing` once bytes come
    back, then one result line, `stream <16 MiB sent> <as many came back> <the same bytes>`.
    The floor is counted, not timed: a test that stops the stream soon after a hand-over
    (one second on a loaded machine can carry less than 16 MiB) still gets a stream that
    kept flowing, and a stall still shows as False."""
    return f"""
import hashlib, os, socket, sys, threading, time
s = socket.create_connection(("{host}", {port}), timeout=30, source_address=("{source}", 0))
s.sendall(b"ECHO\\n")
sent, got, stop = hashlib.sha256(), hashlib.sha256(), threading.Event()
counts = [0, 0]

def read():
    while chunk := s.recv(1 << 16):
        if not counts[1]:
            print("flowing", flush=True)  # the relay has the connection: bytes came back
        got.update(chunk)
        counts[1] += len(chunk)

reader = threading.Thread(target=read)
reader.start()
stopped_at = [0.0]
threading.Thread(target=lambda: (sys.stdin.readline(), stopped_at.__setitem__(0, time.monotonic()), stop.set()),
                 daemon=True).start()
start = time.monotonic()
FLOOR = 16 << 20
try:
    while not stop.is_set() or counts[0] <= FLOOR:  # about 8 MB/s until the test says stop, and past the floor
        if stop.is_set() and time.monotonic() - stopped_at[0] > 30:
            break  # a stream that cannot reach the floor: its result line says so
        chunk = os.urandom(1 << 16)
        sent.update(chunk)
        s.sendall(chunk)
        counts[0] += len(chunk)
        time.sleep(max(0.0, counts[0] / (8 << 20) - (time.monotonic() - start)))
    s.shutdown(socket.SHUT_WR)
except OSError as err:
    print("stream error after", counts, "bytes:", repr(err), flush=True)
    raise
reader.join(30)
print("stream", counts[0] > FLOOR, counts[0] == counts[1], sent.digest() == got.digest(), flush=True)
"""


STREAM = stream_code(TCP_SVC, 80)

HALF_CLOSED = f"""
import hashlib, os, socket
s = socket.create_connection(("{TCP_SVC}", 80), timeout=30)
data = os.urandom(4 << 20)
s.sendall(b"SINK 8\\n" + data)
s.shutdown(socket.SHUT_WR)
print("shut", flush=True)
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print("answer", answer.decode().strip() == f"{{len(data)}} {{hashlib.sha256(data).hexdigest()}}", flush=True)
"""

UDP_FLOW = f"""
import socket, sys, threading, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("{UDP_SVC}", 53))  # a connected socket takes answers from the service address only
s.settimeout(2)
stop = threading.Event()
stopped_at = [0.0]
threading.Thread(target=lambda: (sys.stdin.readline(), stopped_at.__setitem__(0, time.monotonic()), stop.set()),
                 daemon=True).start()
pods, sent, got = set(), 0, 0
end = time.monotonic() + 60
while not stop.is_set() and time.monotonic() < end:  # until the test says stop
    s.send(b"q%d" % sent)
    sent += 1
    answer = s.recv(2000)
    head, _, body = answer.partition(b"\\n")
    got += body == b"q%d" % (sent - 1)
    pods.add(head.split()[0])
    if sent == 1:
        print("answered", flush=True)
    time.sleep(0.05)
print("udp", sent == got, len(pods), flush=True)
"""
