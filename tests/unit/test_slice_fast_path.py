"""The EndpointSlice endpoint fast path (`objects._plain_endpoint`) reads exactly what the careful
path (`_slice_endpoint`, with `Field`s) reads, and hands every other shape to it."""

from __future__ import annotations

from typing import Any

import pytest

import pyproxy.model.objects as objects


def slice_with(endpoint: Any, address_type: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": [endpoint]}


ENDPOINTS: list[Any] = [
    {"addresses": ["10.0.0.1"]},
    {"addresses": ["10.0.0.1", "10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
    {"addresses": ["10.0.0.1"], "conditions": {}, "nodeName": "node1"},
    {"addresses": ["10.0.0.1"], "nodeName": ""},
    {"addresses": ["255.255.255.255"], "conditions": {"ready": None}},
    {"addresses": ["10.0.0.01"]},  # leading zero: the careful path rejects it
    {"addresses": ["10.0.0.256"]},
    {"addresses": ["10.0.0"]},
    {"addresses": ["１0.0.0.1"]},  # a non-ASCII digit
    {"addresses": ["fd00::1"]},  # the wrong family
    {"addresses": [7]},
    {"addresses": []},
    {"addresses": "10.0.0.1"},
    {"addresses": ["10.0.0.1"], "conditions": {"ready": 1}},
    {"addresses": ["10.0.0.1"], "conditions": ["ready"]},
    {"addresses": ["10.0.0.1"], "nodeName": 3},
    {"addresses": ["10.0.0.1"], "nodeName": "n" * 300},
    {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "zone-a"}]}},
    "not a mapping",
]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[str(i) for i in range(len(ENDPOINTS))])
def test_the_fast_path_reads_what_the_careful_path_reads(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_parts: list[str] = []
    fast = objects.parse_endpoint_slice(slice_with(endpoint), report=lambda e: fast_parts.append(str(e)))
    monkeypatch.setattr(objects, "_plain_endpoint", lambda raw: None)
    careful_parts: list[str] = []
    careful = objects.parse_endpoint_slice(slice_with(endpoint), report=lambda e: careful_parts.append(str(e)))
    assert fast == careful and fast_parts == careful_parts


def test_the_fast_path_takes_the_common_shape_and_leaves_the_rest() -> None:
    assert objects._plain_endpoint({"addresses": ["10.0.0.1"], "conditions": {"ready": True}}) is not None
    assert objects._plain_endpoint({"addresses": ["10.0.0.01"]}) is None
    assert objects._plain_endpoint({"addresses": ["10.0.0.1"], "hints": {}}) is None


def test_canonical_ipv4_is_exactly_what_ipaddress_prints() -> None:
    """Every octet spelling 0-999 with and without leading zeros, in every position, and the
    shapes a regular expression could get wrong (a trailing newline, non-ASCII digits)."""
    import ipaddress
    import itertools

    from pyproxy.model.objects import _canonical_ipv4

    spellings = [str(n) for n in range(1000)] + [f"0{n}" for n in range(100)] + ["00", "", "a", "١", "1 "]
    for position, spelling in itertools.product(range(4), spellings):
        parts = ["10", "1", "2", "3"]
        parts[position] = spelling
        text = ".".join(parts)
        try:
            expected = str(ipaddress.IPv4Address(text)) == text
        except ValueError:
            expected = False
        assert _canonical_ipv4(text) is expected, text
    for text in ("1.2.3.4\n", "1.2.3", "1.2.3.4.5", "1..2.3", " 1.2.3.4", "1.2.3.4 "):
        assert not _canonical_ipv4(text), text
