"""The fast data path on the real kernel, in a private namespace (privileged tier).

- Data integrity: 100 MiB each way with SHA-256 through each splice relay variant (os.splice
  after 64 KiB, os.splice from the first byte), with the client's half-close forwarded while
  the server's answer still flows.
- The idle timeout closes pairs on the splice relay (one sweep timer, not one per pair).
- Copy <-> splice switching (model/copymode.py) on one connection: small round trips, bulk,
  small again, then half-close, on the compiled copy step and on the pure-Python one; the
  relay holds pipes while the bulk flows and none once small messages are back; a client
  that never reads a bulk answer costs the relay a bounded amount of memory, and the relay
  keeps serving others meanwhile.
- The reuseport steering program picks the socket `steering.worker_for` predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import private_netns, privileged_reason, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
SERVER_PORT = 9100
ECHO_PORT = 9101
SOURCE_PORT = 9102  # bench.backend: streams at a client that asks (protocol mode D)
MIB = 100
RELAYS = {  # port -> relayrig arguments
    15002: ("--relay", "splice"),
    15003: ("--relay", "splice", "--splice-after", "0"),
    15004: ("--relay", "splice", "--idle-timeout", "0.6", "--half-close-timeout", "0.3"),
    15005: ("--relay", "splice", "--backend-of-port", str(ECHO_PORT)),
    15006: ("--relay", "splice", "--backend-of-port", str(ECHO_PORT), "--pure-python"),
    15007: ("--relay", "splice", "--backend-of-port", str(SOURCE_PORT)),
}

pytestmark = pytest.mark.privileged
RELAY_PIDS: dict[int, int] = {}  # port -> pid of `ip netns exec` (which execs the relay: same pid)


def _exec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    procs: list[subprocess.Popen[bytes]] = []
    with private_netns(f"pbt{os.getpid()}-dp") as name:
        try:
            procs.append(subprocess.Popen(
                _exec(name, sys.executable, "-m", "tests.bench.integrity", "server", str(SERVER_PORT), str(MIB)),
                cwd=ROOT, start_new_session=True))
            procs.append(subprocess.Popen(
                _exec(name, sys.executable, "-m", "tests.bench.phases", "server", str(ECHO_PORT)),
                cwd=ROOT, start_new_session=True))
            procs.append(subprocess.Popen(
                _exec(name, sys.executable, "-m", "bench.backend", "--port", str(SOURCE_PORT), "--name", "b",
                      "--host", "127.0.0.1"), cwd=ROOT, start_new_session=True))
            for port, args in RELAYS.items():
                backend = SERVER_PORT
                if "--backend-of-port" in args:
                    backend = int(args[args.index("--backend-of-port") + 1])
                    args = args[:args.index("--backend-of-port")] + args[args.index("--backend-of-port") + 2:]
                env = dict(os.environ)
                if "--pure-python" in args:
                    args = tuple(a for a in args if a != "--pure-python")
                    env["PYPROXY_PURE_PYTHON"] = "1"
                proc = subprocess.Popen(
                    _exec(name, sys.executable, "-m", "bench.relayrig", "--listen", f"127.0.0.1:{port}",
                          "--backend", f"127.0.0.1:{backend}", "--seconds", "600", *args),
                    cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
                procs.append(proc)
                RELAY_PIDS[port] = proc.pid
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


@pytest.mark.parametrize("port", [15002, 15003])
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


@pytest.mark.parametrize("port", [15005, 15006], ids=["compiled", "pure-python"])
def test_one_connection_switches_copy_splice_copy_with_bytes_intact(netns: str, port: int) -> None:
    done = subprocess.run(_exec(netns, sys.executable, "-m", "tests.bench.phases", "client",
                                f"127.0.0.1:{port}", str(RELAY_PIDS[port])),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    before = result["pipes_before"]
    assert result == {"intact": True, "pipes_before": before, "pipes_bulk": result["pipes_bulk"],
                      "pipes_after": before, "eof": True}, result  # back to copying: its pipes are gone
    assert result["pipes_bulk"] >= before + 2  # at least one direction spliced while the bulk flowed


_NEVER_READS = """
import socket, struct, time, sys
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
pid = int(sys.argv[1])
before = rss(pid)
s = socket.create_connection(("127.0.0.1", 15007), timeout=5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.sendall(struct.pack("!cII", b"D", 0, 65536))  # bench protocol: the backend streams at us
time.sleep(2.0)  # ... and we never read
during = rss(pid)
o = socket.create_connection(("127.0.0.1", 15007), timeout=5)  # the relay still serves others
o.sendall(struct.pack("!cII", b"R", 5, 7) + b"hello")
got = b""
while len(got) < 7:
    got += o.recv(7)
print(during - before, len(got))
"""


def test_a_client_that_never_reads_a_bulk_answer_costs_bounded_memory(netns: str) -> None:
    done = subprocess.run(_exec(netns, sys.executable, "-c", _NEVER_READS, str(RELAY_PIDS[15007])),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    grown_kib, answered = (int(x) for x in done.stdout.split())
    assert answered == 7
    assert grown_kib < 8 * 1024, f"the relay grew {grown_kib} KiB for one client that never reads"
