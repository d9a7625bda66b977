"""The rtnetlink request that sets a per-interface IPv4 setting (pure encoding)."""

from __future__ import annotations

import socket
import struct

import pytest

from pyproxy.dataplane.devconf import IPV4_DEVCONF_SRC_VMARK, RTM_SETLINK, ack_error, setlink_message


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out.append((kind & 0x3FFF, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def test_setlink_nests_af_spec_inet_conf_with_the_setting() -> None:
    msg = setlink_message(7, {IPV4_DEVCONF_SRC_VMARK: 1}, seq=9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), RTM_SETLINK, 9) and flags & 0x4  # an ACK is asked for
    family, _, _, index, _, _ = struct.unpack_from("=BBHiII", msg, 16)
    assert (family, index) == (socket.AF_UNSPEC, 7)
    [(af_spec, inet)] = attrs(msg[32:])
    [(family_attr, conf)] = attrs(inet)
    [(conf_attr, values)] = attrs(conf)
    assert (af_spec, family_attr, conf_attr) == (26, socket.AF_INET, 1)
    assert attrs(values) == [(IPV4_DEVCONF_SRC_VMARK, struct.pack("=I", 1))]


def test_ack_error_reads_the_errno() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -22) + b"\0" * 16
    assert ack_error(ack) == 22
    assert ack_error(ack[:16] + struct.pack("=i", 0) + ack[20:]) == 0
    with pytest.raises(ValueError):
        ack_error(struct.pack("=IHHII", 16, 16, 0, 1, 0))
