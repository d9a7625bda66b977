"""Letting go of a listener (dataplane/letgo.py) on the real kernel, in a private namespace:
a connection already queued is accepted whole, a connection attempted meanwhile is neither
refused nor reset but retransmits its SYN and reaches the listener bound after the close."""

from __future__ import annotations

import pytest

from tests.conftest import run_in_private_netns

pytestmark = pytest.mark.privileged

SCRIPT = """
import asyncio, socket, threading, time
from pyproxy.dataplane import letgo

old = socket.socket(); old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
old.bind(("127.0.0.1", 0)); old.listen(16); port = old.getsockname()[1]
queued = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(3)]
deadline = time.monotonic() + 2
while letgo.queue_length(old) < 3:
    assert time.monotonic() < deadline, "three in the queue"
    time.sleep(0.01)
outcome = {}

def late():  # attempted once the filter is on: must end on the new listener
    sock = socket.socket(); sock.settimeout(5)
    started = time.monotonic()
    try:
        sock.connect(("127.0.0.1", port)); sock.sendall(b"late"); outcome["late"] = (sock.recv(16), time.monotonic() - started)
    except OSError as err:
        outcome["late"] = (repr(err), time.monotonic() - started)
    sock.close()

accepted = []

async def let_go():
    loop = asyncio.get_running_loop()
    old.setblocking(False)
    def accept():
        while True:
            try:
                accepted.append(old.accept()[0])
            except BlockingIOError:
                return
    letgo.refuse_handshakes(old)
    thread = threading.Thread(target=late); thread.start()
    deadline = time.monotonic() + 5
    while not any(line.split()[3] == "02" for line in open("/proc/net/tcp").read().splitlines()[1:]):
        assert time.monotonic() < deadline, "the late SYN was sent"  # 02: SYN_SENT
        await asyncio.sleep(0.01)
    loop.add_reader(old.fileno(), accept)
    left = await letgo.empty_the_queues([old], grace=0.1, within=2.0)
    loop.remove_reader(old.fileno())
    return left, thread

left, thread = asyncio.run(let_go())
assert left == 0 and len(accepted) == 3, (left, len(accepted))
assert "late" not in outcome, outcome  # its SYN was dropped, not answered
old.close()
new = socket.socket(); new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
new.bind(("127.0.0.1", port)); new.listen(16)
conn, _ = new.accept(); conn.sendall(conn.recv(16).upper()); thread.join(10)
answer, took = outcome["late"]
assert answer == b"LATE" and 0.8 < took < 4, outcome
for client, server in zip(queued, accepted):
    client.sendall(b"q"); assert server.recv(1) == b"q"
print("ok")
"""


def test_a_let_go_listener_resets_nothing_and_late_syns_reach_the_next_one() -> None:
    done = run_in_private_netns("pyproxy-letgo", SCRIPT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
