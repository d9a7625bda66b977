"""The state of a moving connection: encode/decode round trips, refusals, and which pairs move."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pyproxy.lifecycle.connections import _absorb_pipes
from pyproxy.dataplane.connstate import (
    STATE_VERSION,
    DirectionState,
    StateError,
    TcpState,
    UdpState,
    decode_tcp,
    decode_udp,
    encode_tcp,
    encode_udp,
    movable,
)
from pyproxy.model.objects import ServiceKey, ServicePortName

WEB = ServicePortName(ServiceKey("default", "web"), "http", "TCP")
DNS = ServicePortName(ServiceKey("kube-system", "kube-dns"), "dns", "UDP")


def pair(**fields: Any) -> TcpState:
    base: dict[str, Any] = dict(port=WEB, client=("192.168.56.100", 40000), frontend=("10.96.3.1", 80),
                                endpoint=("10.244.1.2", 8080), age=12.5, idle=0.25, bytes_in=10, bytes_out=2000)
    return TcpState(**{**base, **fields})


def test_a_tcp_pair_survives_encode_and_decode_with_its_bytes_and_half_close() -> None:
    state = pair(up=DirectionState(eof=True, shut=False, held=bytes(range(256)) * 3),
                 down=DirectionState(pipe=True, in_pipe=65536))
    body = encode_tcp(state)
    assert body["v"] == STATE_VERSION
    assert decode_tcp(body) == state
    assert state.fd_count == 4, "client, upstream, and the down direction's pipe"
    assert pair().fd_count == 2


def test_a_udp_flow_survives_encode_and_decode() -> None:
    state = UdpState(DNS, ("10.244.1.9", 40000), ("10.96.0.10", 53), ("10.244.2.2", 53), 3.0, 1.5, 40, 80)
    assert decode_udp(encode_udp(state)) == state


@pytest.mark.parametrize(("change", "named"), [
    (lambda b: b.update(v=STATE_VERSION + 1), "state version 2"),
    (lambda b: b.pop("v"), "state version None"),
    (lambda b: b.update(client=["10.0.0.1"]), "'client'"),
    (lambda b: b.update(endpoint=["10.0.0.1", 70000]), "'endpoint'"),
    (lambda b: b.update(idle=-1), "'idle' is negative"),
    (lambda b: b.update(bytes_in=True), "'bytes_in'"),
    (lambda b: b["up"].update(held="not base64!"), "'held' is not base64"),
    (lambda b: b["down"].update(shut=True), "shut without eof"),
    (lambda b: b["up"].update(in_pipe=5), "pipe that is not sent"),
    (lambda b: b["port"].pop("namespace"), "'port'"),
])
def test_a_body_this_version_cannot_read_is_refused_naming_why(change: Any, named: str) -> None:
    body = encode_tcp(pair())
    change(body)
    with pytest.raises(StateError, match=named):
        decode_tcp(body)


def test_only_established_pairs_with_empty_write_buffers_move() -> None:
    assert movable(connected=True, closed=False, write_buffered=0) is None
    assert movable(connected=False, closed=False, write_buffered=0) == "dialing"
    assert movable(connected=True, closed=False, write_buffered=1) == "mid-write"
    assert movable(connected=True, closed=True, write_buffered=0) == "closed"


def test_pipe_contents_become_held_bytes_for_a_relay_without_pipes() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"from the pipe")
    state = pair(down=DirectionState(held=b"held first, ", pipe=True, in_pipe=13))
    absorbed = _absorb_pipes(state, [read_end, write_end])
    assert absorbed.down == DirectionState(held=b"held first, from the pipe")
    assert absorbed.up == state.up and absorbed.fd_count == 2
    for fd in (read_end, write_end):
        with pytest.raises(OSError):
            os.fstat(fd)  # both ends were closed


def test_a_pipe_holding_less_than_its_state_says_is_an_error() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"short")
    os.close(write_end)
    with pytest.raises(StateError, match="held 5 bytes, its state said 9"):
        _absorb_pipes(pair(up=DirectionState(pipe=True, in_pipe=9)), [read_end, os.dup(read_end)])
