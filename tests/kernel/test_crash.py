"""Crashes on the real kernel: `kill -9` of the serving process while its supervisor holds the
listeners (pyproxy/lifecycle/master.py), a crash loop, and a crash in the middle of a hand-over.

The lab is test_handover.py's (a client, node1, three echo pods behind a Service with ClientIP
affinity on TCP 80 and UDP 53). The supervisor writes which pid serves which slot to
`<stateDir>/supervisor.json`; the tests kill those pids, never the supervisor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel.test_handover import Node, clean_node, read, read_snapshot_file, results, sticky_lab, wait_for

pytestmark = pytest.mark.privileged

FAST_SNAPSHOT = "apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\nlifecycle:\n  snapshotInterval: 300ms\n"


@pytest.fixture(scope="module")
def lab_node() -> Iterator[Node]:
    yield from sticky_lab("pyproxy-crash-", FAST_SNAPSHOT)


@pytest.fixture
def node(lab_node: Node) -> Iterator[Node]:
    yield from clean_node(lab_node)


def status(node: Node) -> dict[str, Any]:
    try:
        return dict(json.loads(read(node.state / "supervisor.json") or "{}"))
    except ValueError:  # never torn (it is renamed into place), but be clear if it were
        return {}


def serving_pid(node: Node, slot: str = "0") -> int | None:
    entry = status(node).get("slots", {}).get(slot, {})
    return int(entry["pid"]) if entry.get("state") == "serving" and entry.get("pid") else None


def wait_serving(node: Node, other_than: int | None, timeout: float = 20, slot: str = "0") -> int:
    wait_for(lambda: serving_pid(node, slot) not in (None, other_than), timeout, lambda: json.dumps(status(node)))
    pid = serving_pid(node, slot)
    assert pid is not None
    return pid


def in_flight(failure: str) -> bool:
    """A TCP attempt cut by the kill: closed or reset after connecting, never refused or left
    waiting (the loop's failure lines are "<seconds>s <what>")."""
    what = failure.split("s ", 1)[1] if "s " in failure else failure
    return what.strip() == "" or what.startswith("ConnectionResetError")


def pins_written(node: Node) -> bool:
    try:
        doc = read_snapshot_file(node.state / "state.json")
    except ValueError:
        return False
    return {len(part["pins"]) for part in doc.get("affinity", [])} == {1}


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_of_the_serving_process_fails_no_new_connection_and_keeps_pins(node: Node, workers: int) -> None:
    """The supervisor keeps the listeners: connections and datagrams sent while the serving
    process is dead wait in the kernel's queues and the next process serves them, within a
    1 s client timeout; every client stays on its pod (the pins come back from the
    snapshot). Twice, under TCP and UDP loops."""
    supervisor, log = node.start("--config", str(node.workdir / "config.yaml"), "--workers", str(workers))
    slots = [str(i) for i in range(workers)]
    serving = {slot: wait_serving(node, None, slot=slot) for slot in slots}
    stop = node.workdir / "stop"
    loops = node.loops(stop, timeout=1.0, interval=0.01, reply_timeout=1.0)
    try:
        time.sleep(0.5)
        wait_for(lambda: pins_written(node), 10, lambda: read(node.state / "state.json"))
        time.sleep(0.7)  # both pins written at least once more
        for _ in range(2):
            for pid in serving.values():  # every worker: each is started again alone, on its own socket
                os.kill(pid, signal.SIGKILL)
            serving = {slot: wait_serving(node, serving[slot], slot=slot) for slot in slots}
            time.sleep(1.5)
        assert supervisor.poll() is None, read(log)
    finally:
        tcp, udp = results(loops, stop)
    text = read(log)
    assert text.count("died (signal SIGKILL); starting another now") == 2 * workers, text
    assert "restored 2 affinity pins" in text, text
    assert tcp["ok"] > 50 and udp["ok"] > 50, (tcp, udp)
    # a request the killed process was in the middle of (an accepted connection, a datagram it
    # had read) is lost with it, like every established connection (docs/restarts.md): at
    # most one per kill and loop, and only of that kind; every new one is served
    timeline = "\n".join(line for line in text.splitlines()
                         if any(k in line for k in ("died", "serves slot", "serving on node", "synced 1")))
    assert tcp["failed"] <= 2 and udp["failed"] <= 2, json.dumps([tcp, udp]) + timeline
    assert all(in_flight(f) for f in tcp["failures"]), json.dumps(tcp) + timeline
    assert len(tcp["pods"]) == 1 and len(udp["pods"]) == 1, (tcp, udp)  # the pins survived both crashes
    assert node.healthz() == "200"
    print(f"\nkill -9 x2 ({workers} worker(s)): tcp {tcp['ok']} ok {tcp['failed']} in flight lost, "
          f"longest wait {tcp['gap_ms']} ms, "
          f"blackhole {tcp['blackhole_ms']} ms; udp {udp['ok']} ok {udp['failed']} in flight lost, "
          f"longest wait {udp['gap_ms']} ms")


def test_a_crash_loop_backs_off_and_healthz_says_so(node: Node) -> None:
    """Deaths in a row: the first two are restarted at once, later ones after a growing
    back-off; meanwhile the supervisor answers /healthz itself (503, crashLoop) and /livez
    (200). The next process serves again and /healthz is 200."""
    supervisor, log = node.start()
    pid = wait_serving(node, None)
    for _ in range(4):
        os.kill(pid, signal.SIGKILL)
        pid = wait_serving(node, pid)
    os.kill(pid, signal.SIGKILL)  # the 5th death within a minute: 2 s of back-off
    wait_for(lambda: "crash loop (5 deaths within a minute)" in read(log), 5, lambda: read(log))
    answer = node.lab.exec("node1", "curl", "-s", "-m", "2", "-w", " %{http_code}",
                           "http://127.0.0.1:10256/healthz", check=False).stdout
    body, code = answer.rsplit(" ", 1)
    assert code == "503", answer
    doc = json.loads(body)
    assert doc["crashLoop"] is True and doc["restarts"] == 5 and doc["nextStartSeconds"] > 0, doc
    live = node.lab.exec("node1", "curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}",
                         "http://127.0.0.1:10256/livez", check=False).stdout
    assert live == "200", live  # the supervisor is alive: a liveness probe must not restart the container
    assert "starting another in 2.0s" in read(log), read(log)
    wait_serving(node, pid)
    wait_for(lambda: node.healthz() == "200", 10, lambda: read(log))
    assert status(node)["crashLoop"] is True  # until a process has served for a while
    assert supervisor.poll() is None


def test_a_crash_of_the_old_process_in_the_middle_of_a_hand_over(node: Node) -> None:
    """The old serving process dies (kill -9) after it handed the listeners out and before the
    successor serves: the successor serves anyway, the old supervisor sees the hand-over
    socket replaced and lets go instead of starting another, and no new connection fails."""
    old, old_log = node.start("--config", str(node.workdir / "config.yaml"))
    old_pid = wait_serving(node, None)
    stop = node.workdir / "stop"
    loops = node.loops(stop, timeout=1.0, interval=0.01, reply_timeout=1.0)
    try:
        time.sleep(0.5)
        new, new_log = node.start("--config", str(node.workdir / "config.yaml"), wait="handed over tcp")
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: "pyproxy serving on node" in read(new_log), 15, lambda: read(new_log), new)
        assert old.wait(20) == 0, read(old_log)
        time.sleep(1.0)
    finally:
        tcp, udp = results(loops, stop)
    assert "a successor serves (it replaced the hand-over socket); letting go" in read(old_log), read(old_log)
    assert "no successor took over" not in read(old_log) and read(old_log).count("serves slot 0") == 1, read(old_log)
    assert new.poll() is None, read(new_log)
    # as in the kill -9 test: only what the killed process was in the middle of may be lost
    assert tcp["failed"] <= 1 and udp["failed"] <= 1, json.dumps([tcp, udp])
    assert all(in_flight(f) for f in tcp["failures"]), json.dumps(tcp)
    assert tcp["ok"] > 50 and udp["ok"] > 50, (tcp, udp)
    assert node.healthz() == "200"


def test_a_crash_of_the_successor_in_the_middle_of_a_hand_over(node: Node) -> None:
    """The successor's serving process dies (kill -9) after it received the listeners, while it
    syncs: the old process keeps serving (the successor never said it serves) or, had it
    said so, the successor's supervisor holds the listeners; either way the successor's
    supervisor starts another, which takes over, and no new connection fails."""
    old, old_log = node.start("--config", str(node.workdir / "config.yaml"))
    stop = node.workdir / "stop"
    loops = node.loops(stop, timeout=1.0, interval=0.01, reply_timeout=1.0)
    try:
        time.sleep(0.5)
        new, new_log = node.start("--config", str(node.workdir / "config.yaml"), wait="handed over tcp")
        first = int(re.findall(r"serving process (\d+) serves slot 0", read(new_log))[0])
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "died (signal SIGKILL); starting another now" in read(new_log), 10,
                 lambda: read(new_log), new)
        assert old.wait(20) == 0, read(old_log)  # it handed over to the second one, then left
        wait_for(lambda: "hand-over complete" in read(new_log), 10, lambda: read(new_log), new)
        time.sleep(1.0)
    finally:
        tcp, udp = results(loops, stop)
    assert new.poll() is None, read(new_log)
    assert tcp["failed"] <= 1 and udp["failed"] <= 1, json.dumps([tcp, udp])
    assert all(in_flight(f) for f in tcp["failures"]), json.dumps(tcp)
    assert tcp["ok"] > 50 and udp["ok"] > 50, (tcp, udp)
    assert len(tcp["pods"]) == 1 and len(udp["pods"]) == 1, (tcp, udp)
    assert node.healthz() == "200"
