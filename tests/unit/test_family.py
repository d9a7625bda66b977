"""Address families: the pure decisions of pyproxy/model/family.py, as tables."""

from __future__ import annotations

import pytest

from pyproxy.model.family import (
    Family,
    by_family,
    family_of,
    host_port,
    join_host_port,
    node_port_candidate,
    split_host_port,
)


@pytest.mark.parametrize(("ip", "family"), [
    ("10.96.0.1", Family.IPV4), ("fd00:96::1", Family.IPV6), ("::ffff:10.0.0.1", Family.IPV6), ("::", Family.IPV6),
])
def test_family_of(ip: str, family: Family) -> None:
    assert family_of(ip) is family


@pytest.mark.parametrize(("ip", "port", "text"), [
    ("10.96.0.1", 80, "10.96.0.1:80"),
    ("fd00:96::1", 80, "[fd00:96::1]:80"),
    ("::1", 15001, "[::1]:15001"),
    ("fe80::1%eth0", 53, "[fe80::1%eth0]:53"),
])
def test_host_port_round_trip(ip: str, port: int, text: str) -> None:
    assert join_host_port(ip, port) == text
    assert split_host_port(text) == (ip, port)


@pytest.mark.parametrize("text", ["fd00::1:80", "[fd00::1]80", "10.0.0.1", "[fd00::1]:http", "10.0.0.1:"])
def test_split_host_port_refuses_ambiguous_or_broken_text(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text)


def test_kernel_socket_addresses_are_cut_to_host_and_port() -> None:
    assert host_port(("fd00::1", 80, 0, 0)) == ("fd00::1", 80)
    assert host_port(("10.0.0.1", 80)) == ("10.0.0.1", 80)


@pytest.mark.parametrize(("ip", "serves"), [
    ("192.168.56.101", True), ("127.0.0.1", True),  # IPv4 as before
    ("fd00:56::101", True), ("2001:db8::1", True),
    ("fe80::1", False), ("fe80::1%eth0", False), ("::1", False),  # link-local and loopback: never
])
def test_node_port_candidates(ip: str, serves: bool) -> None:
    assert node_port_candidate(ip) is serves


def test_by_family_keeps_order() -> None:
    assert by_family(["fd00::2", "10.0.0.1", "fd00::1"]) == {
        Family.IPV6: ("fd00::2", "fd00::1"), Family.IPV4: ("10.0.0.1",)}


def test_nft_family_names() -> None:
    assert [f.nft for f in Family] == ["ip", "ip6"]
