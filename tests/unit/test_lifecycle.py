"""The hand-over room's pure parts and its channel (pyproxy/lifecycle): framing with real
descriptors over a socketpair, refusals, the state codec with ages, the snapshot's checks."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from pyproxy.demo import manifests as m
from pyproxy.lifecycle.channel import HEADER, MAGIC, Channel, ChannelError, Message
from pyproxy.lifecycle.handover import PROTOCOL, Identity, refusal
from pyproxy.lifecycle.snapshot import Deferred, decode_snapshot, encode_snapshot, read_snapshot, write_atomically
from pyproxy.lifecycle.state import (
    StateError,
    StoreEncoder,
    affinity_state,
    restore_affinity,
    restore_store,
    store_state,
)
from pyproxy.model.objects import ServicePortName, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable


def pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a, 2.0), Channel(b, 2.0)


def test_messages_carry_bodies_and_working_descriptors_in_order() -> None:
    left, right = pair()
    read_end, write_end = os.pipe()
    try:
        left.send(Message("listeners", {"names": ["pipe"]}, (read_end,)))
        left.send(Message("affinity", {"affinity": [1, "two", None]}))
        got = right.receive()
        assert got.kind == "listeners" and got.body == {"names": ["pipe"]} and len(got.fds) == 1
        assert got.fds[0] != read_end  # the receiver's own copy
        os.write(write_end, b"through the copy")
        assert os.read(got.fds[0], 100) == b"through the copy"
        os.close(got.fds[0])
        assert right.receive(expect_fds=False) == Message("affinity", {"affinity": [1, "two", None]})
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()


def test_a_large_body_arrives_whole() -> None:
    left, right = pair()
    body = {"pins": [[f"10.0.{i // 250}.{i % 250}", "10.244.1.2", 80, i / 7] for i in range(40000)]}
    import threading

    sender = threading.Thread(target=left.send, args=(Message("state", body),))
    sender.start()
    assert right.receive().body == body
    sender.join(5)
    left.close()
    right.close()


@pytest.mark.parametrize("frame, error", [
    (b"NOPE" + struct.pack("!I", 3) + b"x\n{}", "not a hand-over frame"),
    (HEADER.pack(MAGIC, 9) + b"state\n[1]", "must be a JSON object"),
    (HEADER.pack(MAGIC, 8) + b"state\n{x", "not JSON"),
    (HEADER.pack(MAGIC, 1 << 30), "more than"),
    (HEADER.pack(MAGIC, 20) + b"state\n{", "the peer closed the channel"),
])
def test_bad_frames_are_errors_that_say_what(frame: bytes, error: str) -> None:
    left, right = pair()
    left.sock.sendall(frame)
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError, match=error):
        right.receive()
    left.close()
    right.close()


def test_unexpected_descriptors_are_closed_and_refused() -> None:
    left, right = pair()
    read_end, write_end = os.pipe()
    left.send(Message("hello", {}, (read_end,)))
    os.close(read_end)
    with pytest.raises(ChannelError, match="unexpected descriptors"):
        right.receive(expect_fds=False)
    with pytest.raises(BrokenPipeError):  # no copy of the read end is left open anywhere
        os.write(write_end, b"x")
    os.close(write_end)
    left.close()
    right.close()


def test_a_silent_peer_costs_one_timeout() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(b, 0.2)
    started = time.monotonic()
    with pytest.raises(ChannelError, match="timed out"):
        channel.receive()
    assert time.monotonic() - started < 1.5
    a.close()
    channel.close()


def test_bad_kinds_are_refused_before_sending() -> None:
    left, right = pair()
    for kind in ("", "two\nlines", "x" * 65):
        with pytest.raises(ChannelError, match="kind"):
            left.send(Message(kind))
    left.close()
    right.close()


MINE = Identity(PROTOCOL, "0.1.0", 10, 4026531840, "node1", 0, 1, 15001, 15001)


def hello(**changes: object) -> dict[str, object]:
    body = dict(vars(MINE))
    body.update(changes)
    return body


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"release": "0.2.0", "pid": 11}, None),  # an upgrade of the same protocol
    ({"protocol": PROTOCOL + 1}, f"hand-over protocol {PROTOCOL + 1} is not this process's {PROTOCOL}"),
    ({"protocol": None}, "is not this process's"),  # a hello without one
    ({"netns": 1}, "another network namespace"),
    ({"workers": 2}, "workers differ"),
    ({"tcpPort": 15002}, "tcpPort differs"),
])
def test_refusals(changes: dict[str, object], reason: str | None) -> None:
    got = refusal(MINE, hello(**changes))
    assert (got is None) if reason is None else (got is not None and reason in got), got


# --- the state: store and affinity ---------------------------------------------------------

def filled_store() -> ClusterStore:
    store = ClusterStore()
    svc = parse_service(m.service("web", "10.96.0.10", [m.port(80, 8080, name="http"), m.port(53, 53, name="dns",
                                                                                             protocol="UDP")],
                                  affinity_timeout=600, type="NodePort"))
    slices = [parse_endpoint_slice(m.endpoint_slice("web", [m.Backend("10.244.1.2", "node1"),
                                                            m.Backend("10.244.2.3", "node2")],
                                                    [m.slice_port(8080, name="http"),
                                                     m.slice_port(53, name="dns", protocol="UDP")]))]
    assert svc is not None and slices[0] is not None
    store.replace_all([svc], [s for s in slices if s is not None])
    return store


def test_the_store_round_trips_through_json() -> None:
    store = filled_store()
    again = ClusterStore()
    assert restore_store(again, json.loads(json.dumps(store_state(store)))) == 1
    assert again.services == store.services and again.slices == store.slices and again.synced


def test_the_incremental_encoder_writes_what_store_state_says_and_reencodes_only_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyproxy.lifecycle.state as state_module

    store = filled_store()
    encoder = StoreEncoder()
    assert json.loads(encoder.encode(StoreEncoder.capture(store))) == store_state(store)
    expected = store_state(store)
    encoded: list[object] = []
    real = state_module.encode_obj
    monkeypatch.setattr(state_module, "encode_obj", lambda obj: encoded.append(obj) or real(obj))
    assert json.loads(encoder.encode(StoreEncoder.capture(store))) == expected
    assert encoded == []  # every object's JSON was reused
    svc = parse_service(m.service("web", "10.96.0.11", [m.port(80, 8080, name="http")]))
    assert svc is not None
    store.upsert_service(svc.key, svc)
    captured = StoreEncoder.capture(store)
    store.upsert_service(svc.key, None)  # a change after the capture does not reach its encoding
    again = ClusterStore()
    assert restore_store(again, json.loads(encoder.encode(captured))) == 1
    assert again.services == {svc.key: svc} and encoded[0] is svc and not any(o is store_obj for o in encoded for store_obj in store.slices.values())


def test_a_deferred_part_is_spliced_into_the_snapshot() -> None:
    from pyproxy.lifecycle.snapshot import gunzip, member

    data = encode_snapshot("node1", {"sync": Deferred(lambda: [member(b'{"a":'), member(b"[1]}")]), "affinity": []},
                           5.0)
    doc = json.loads(gunzip(data))
    assert doc["sync"] == {"a": [1]} and doc["affinity"] == [] and doc["node"] == "node1" and doc["written"] == 5.0
    decoded = decode_snapshot(data, "node1", "state.json")
    assert decoded is not None and decoded["sync"] == {"a": [1]}


def test_gzip_members_are_bounded_and_whole() -> None:
    from pyproxy.lifecycle.snapshot import gunzip, member

    assert gunzip(member(b"ab") + member(b"") + member(b"c")) == b"abc"
    assert gunzip(b"") == b""
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        gunzip(member(b"x" * 11), limit=10)
    assert gunzip(member(b"x" * 10), limit=10) == b"x" * 10
    with pytest.raises(ValueError, match="cut short"):
        gunzip(member(b"hello")[:-5])
    with pytest.raises(ValueError, match="not gzip"):
        gunzip(member(b"hello") + b"\x1f\x8bjunkjunkjunkjunkjunk")


def test_a_plain_json_snapshot_of_an_older_release_still_reads() -> None:
    from pyproxy.lifecycle.snapshot import gunzip

    data = gunzip(encode_snapshot("node1", {"affinity": []}, time.time()))
    assert data.startswith(b"{") and decode_snapshot(data, "node1", "state.json") is not None


@pytest.mark.parametrize("broken", [
    {"services": [{"key": "not an object"}], "slices": [], "node": None},
    {"slices": [], "node": None},
    [],
])
def test_a_broken_store_state_is_a_state_error(broken: object) -> None:
    with pytest.raises(StateError):
        restore_store(ClusterStore(), broken)


def table_of(store: ClusterStore) -> ServiceTable:
    table = ServiceTable("node1")
    table.update(store.take_changes() | set(store.services), store, ("192.168.1.10",))
    return table


def test_affinity_moves_with_its_ages_on_the_sliding_clock() -> None:
    store = filled_store()
    old = table_of(store)
    http = ServicePortName(next(iter(store.services)), "http", "TCP")
    affinity = old.balancer(http).affinity
    assert affinity is not None
    affinity.record("192.168.1.50", ("10.244.2.3", 8080), now=1200.0)
    affinity.record("192.168.1.51", ("10.244.1.2", 8080), now=1500.0)
    affinity.record("192.168.1.52", ("10.244.1.2", 8080), now=100.0)  # stale by 1600 (timeout 600)
    body = json.loads(json.dumps(affinity_state(old, now=1600.0)))
    new = table_of(store)
    assert restore_affinity(new, body, now=50.0, extra_age=10.0) == 2  # another clock, 10 s on disk
    assert restore_affinity(table_of(store), body, now=50.0, extra_age=205.0) == 1  # .50 expired meanwhile
    pins = new.balancer(http).affinity
    assert pins is not None
    assert sorted(pins.entries()) == [("192.168.1.50", ("10.244.2.3", 8080), pytest.approx(50.0 - 410.0)),
                                      ("192.168.1.51", ("10.244.1.2", 8080), pytest.approx(50.0 - 110.0))]
    assert pins.lookup("192.168.1.50", now=50.0) == ("10.244.2.3", 8080)
    assert pins.lookup("192.168.1.50", now=50.0 - 410.0 + 601.0) is None  # expires when it would have


def test_a_younger_pin_already_there_wins_and_gone_endpoints_are_dropped() -> None:
    store = filled_store()
    table = table_of(store)
    http = ServicePortName(next(iter(store.services)), "http", "TCP")
    pins = table.balancer(http).affinity
    assert pins is not None
    pins.record("192.168.1.50", ("10.244.1.2", 8080), now=100.0)
    body = [{"port": {"service": {"namespace": "default", "name": "web"}, "port_name": "http", "protocol": "TCP"},
             "pins": [["192.168.1.50", "10.244.2.3", 8080, 30.0], ["192.168.1.60", "10.9.9.9", 8080, 1.0]]}]
    assert restore_affinity(table, body, now=100.0) == 0
    assert pins.entries() == [("192.168.1.50", ("10.244.1.2", 8080), 100.0)]
    with pytest.raises(StateError, match="a pin must be"):
        restore_affinity(table, [{**body[0], "pins": [["192.168.1.50", "10.244.2.3"]]}], now=100.0)


# --- the snapshot -----------------------------------------------------------------------

def test_the_snapshot_round_trips_and_knows_its_age(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    write_atomically(path, encode_snapshot("node1", {"sync": {"a": 1}, "affinity": []}, time.time() - 5))
    got = read_snapshot(path, "node1")
    assert got is not None and got["sync"] == {"a": 1} and 4.5 < got["age"] < 30
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left behind


def test_a_snapshot_older_than_the_bound_is_not_restored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, encode_snapshot("node1", {"sync": {"a": 1}}, time.time() - 120))
    assert read_snapshot(path, "node1", max_age=600) is not None
    assert read_snapshot(path, "node1", max_age=0) is not None  # 0: any age
    assert read_snapshot(path, "node1", max_age=60) is None
    assert "more than lifecycle.snapshotMaxAge (60s)" in caplog.text


@pytest.mark.parametrize("data, line", [
    (b'{"format": "pyproxy-state", "protocol": 1, "node": "node1", "writ', "not valid JSON"),
    (b'{"some": "other file"}', "not a pyproxy state snapshot"),
    (b'{"format": "pyproxy-state", "protocol": 99, "node": "node1", "written": 1}', "written by hand-over protocol 99"),
    (b'{"format": "pyproxy-state", "protocol": 1, "node": "node7", "written": 1}', "it is node 'node7'"),
    (b'{"format": "pyproxy-state", "protocol": 1, "node": "node1"}', "no write time"),
])
def test_a_corrupt_or_foreign_snapshot_is_ignored_with_a_clear_line(data: bytes, line: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert decode_snapshot(data, "node1", "/run/pyproxy/state.json") is None
    assert "ignoring the state snapshot /run/pyproxy/state.json" in caplog.text and line in caplog.text, caplog.text
