"""The fast data path on the real kernel, in a private namespace (privileged tier).

- Data integrity: 100 MiB each way with SHA-256 through each relay variant (Protocol copy,
  os.splice after 64 KiB, os.splice from the first byte), with the client's half-close
  forwarded while the server's answer still flows.
- The idle timeout closes pairs on the splice relay (one sweep timer, not one per pair).
- The reuseport steering program picks the socket `steering.worker_for` predicts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import privileged_reason, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
SERVER_PORT = 9100
MIB = 100
RELAYS = {  # port -> relayrig arguments
    15001: ("--relay", "protocol"),
    15002: ("--relay", "splice"),
    15003: ("--relay", "splice", "--splice-after", "0"),
    15004: ("--relay", "splice", "--idle-timeout", "0.6", "--half-close-timeout", "0.3"),
}

pytestmark = pytest.mark.privileged


def _exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    name = f"pbt{os.getpid()}-dp"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        procs.append(subprocess.Popen(
            _exec(name, sys.executable, "-m", "tests.bench.integrity", "server", str(SERVER_PORT), str(MIB)),
            cwd=ROOT, start_new_session=True))
        for port, args in RELAYS.items():
            procs.append(subprocess.Popen(
                _exec(name, sys.executable, "-m", "bench.relayrig", "--listen", f"127.0.0.1:{port}",
                      "--backend", f"127.0.0.1:{SERVER_PORT}", "--seconds", "600", *args),
                cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs), "a relay or the server exited at start"
        yield name
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", name], timeout=30)


@pytest.mark.parametrize("port", [15001, 15002, 15003])
def test_100_mib_each_way_intact_with_half_close(netns: str, port: int) -> None:
    done = subprocess.run(_exec(netns, sys.executable, "-m", "tests.bench.integrity", "client",
                                f"127.0.0.1:{port}", str(MIB)),
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == "ok", done.stdout + done.stderr[-2000:]


_IDLE_PROBE = """
import socket, time
s = socket.create_connection(("127.0.0.1", 15004), timeout=5)
t0 = time.monotonic()
try:
    s.recv(1)  # nothing comes: the relay closes the idle pair
except ConnectionResetError:
    pass
print(round(time.monotonic() - t0, 2))
"""


def test_idle_pairs_are_closed(netns: str) -> None:
    done = subprocess.run(_exec(netns, sys.executable, "-c", _IDLE_PROBE),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert 0.4 <= float(done.stdout) < 3.0


def test_steering_program_on_the_real_kernel(netns: str) -> None:
    script = """
import select, socket
from pyproxy.dataplane import steering
n = 3
ls = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 7777))
    s.listen(64)
    ls.append(s)
steering.attach(ls[0], n)
wrong = 0
for k in range(1, 121):
    src = f"127.0.{k // 100}.{k % 100 + 1}"
    c = socket.socket()
    c.bind((src, 0))
    c.connect(("127.0.0.1", 7777))
    ready, _, _ = select.select(ls, [], [], 2)
    conn, _ = ready[0].accept()
    conn.close()
    c.close()
    wrong += ls.index(ready[0]) != steering.worker_for(src, n)
print(wrong)
"""
    done = subprocess.run(_exec(netns, sys.executable, "-c", script), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
