"""model/source.py: whose address an endpoint sees (SPEC.md §5), as a table."""

from __future__ import annotations

import ipaddress

import pytest

from pyproxy.model.objects import EndpointSlice, ServiceKey, SliceEndpoint, SlicePort
from pyproxy.model.source import Source, SourcePolicy, bridged_endpoints, source_policy

NODE = "192.168.56.101"
BRIDGE = ipaddress.ip_network("10.244.9.0/24")
POLICY = source_policy([NODE, "fd00:56::101"], ["10.244.1.0/24", "10.244.9.0/24", "fd00:244:1::/64"], [BRIDGE])


@pytest.mark.parametrize(("transparent", "endpoint", "mode"), [
    (True, "10.244.2.7", Source.CLIENT),  # Local from outside: the client's address, always
    (True, "10.244.9.7", Source.CLIENT),
    (False, "10.244.2.7", Source.POD),  # an endpoint on another node
    (False, "10.244.1.7", Source.POD),  # on this node, routed
    (False, "fd00:244:2::7", Source.POD),
    (False, "10.244.9.7", Source.NODE),  # a pod bridge, not steered: it would answer the pod directly
    (False, NODE, Source.NODE),  # the node itself (hostNetwork): its replies leave by output, to the pod
    (False, "192.168.56.102", Source.POD),  # another node (hostNetwork there): replies come back routed
])
def test_target_source(transparent: bool, endpoint: str, mode: Source) -> None:
    assert POLICY.target_source(transparent, endpoint) == mode


@pytest.mark.parametrize(("mode", "client", "endpoint", "keeps"), [
    (Source.POD, "10.244.1.5", "10.244.2.7", True),  # a pod of this node
    (Source.POD, "10.244.9.5", "10.244.2.7", True),  # a pod on this node's bridge, inside its podCIDRs
    (Source.POD, "10.244.11.5", "10.244.2.7", False),  # a bridge's subnet outside the podCIDRs: not a pod
    (Source.POD, "fd00:244:1::5", "fd00:244:2::7", True),
    (Source.POD, "10.244.2.5", "10.244.2.7", False),  # another node's pod: its replies would not come here
    (Source.POD, "192.168.56.100", "10.244.2.7", False),  # outside the cluster
    (Source.POD, NODE, "10.244.2.7", False),  # the node itself
    (Source.POD, "10.244.1.5", "10.244.1.5", False),  # hairpin: the pod reaching itself
    (Source.NODE, "10.244.1.5", "10.244.9.7", False),
    (Source.CLIENT, "192.168.56.100", "10.244.1.7", True),
    (Source.POD, "not an address", "10.244.2.7", False),
])
def test_keeps_client(mode: Source, client: str, endpoint: str, keeps: bool) -> None:
    assert POLICY.keeps_client(mode, client, endpoint) is keeps


def test_no_pods_known_keeps_only_what_the_plan_keeps() -> None:
    """Before the Node is read (or standalone without one and without a pod bridge), no
    client counts as a pod: the node's address, as before."""
    policy = SourcePolicy()
    assert policy.target_source(False, "10.244.2.7") == Source.NODE
    assert policy.target_source(True, "10.244.2.7") == Source.CLIENT
    assert not policy.keeps_client(Source.POD, "10.244.1.5", "10.244.2.7")


def test_prefixes_for_the_engine() -> None:
    assert POLICY.prefixes() == (
        (4, bytes([10, 244, 1, 0]), 24), (4, bytes([10, 244, 9, 0]), 24),
        (6, ipaddress.ip_address("fd00:244:1::").packed, 64))


def test_a_default_route_is_never_a_pod_network() -> None:
    assert source_policy([], ["0.0.0.0/0"], []).pods == ()


STEERED = source_policy([NODE], ["10.244.1.0/24", "10.244.9.0/24"], [BRIDGE, ipaddress.ip_network("10.244.11.0/24")],
                        steered=[BRIDGE])


@pytest.mark.parametrize(("endpoint", "mode"), [
    ("10.244.9.7", Source.POD),  # on a bridge whose endpoints' replies go up to the node
    ("10.244.11.7", Source.NODE),  # on a bridge the table cannot serve (it filters VLANs): the fallback
    (NODE, Source.NODE),  # the node itself still falls back
    ("10.244.2.7", Source.POD),
])
def test_a_steered_bridge_s_endpoints_keep_the_pod_s_address(endpoint: str, mode: Source) -> None:
    assert STEERED.target_source(False, endpoint) == mode


def _endpoint(ip: str, ready: bool = True, terminating: bool = False) -> SliceEndpoint:
    return SliceEndpoint(ip, ready, ready, terminating, "node1", None)


def test_bridged_endpoints_are_every_endpoint_on_a_bridge_whatever_its_conditions() -> None:
    ports = (SlicePort("http", "TCP", 8080), SlicePort("dns", "UDP", 53), SlicePort("s", "SCTP", 9))
    web = EndpointSlice("shop", "web-1", ServiceKey("shop", "web"), ports, (
        _endpoint("10.244.9.5"),
        _endpoint("10.244.9.6", ready=False),  # unready: still answers what it has
        _endpoint("10.244.9.7", ready=False, terminating=True),  # terminating: drains its connections
        _endpoint("10.244.2.5"),  # another node's pod
        _endpoint("10.244.9.1"),  # the node's own address on the bridge
    ), None)
    six = EndpointSlice("shop", "web-2", ServiceKey("shop", "web"), (SlicePort("http", "TCP", 8080),),
                        (_endpoint("fd00:244:9::5"),), None)
    bridges = [BRIDGE, ipaddress.ip_network("fd00:244:9::/64")]
    found = bridged_endpoints([web, six], bridges, {"10.244.9.1"})
    assert found == {(ip, protocol, port) for ip in ("10.244.9.5", "10.244.9.6", "10.244.9.7")
                     for protocol, port in (("TCP", 8080), ("UDP", 53))} | {("fd00:244:9::5", "TCP", 8080)}
    assert bridged_endpoints([web], []) == frozenset()
