"""kube-proxy parity, the pure parts: source ranges, ipMode, hints parsing, the Node's pod
CIDRs and primary IPs, local detection modes, --nodeport-addresses keywords, /configz."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pyproxy.cli import build_parser, effective_config
from pyproxy.config import ConfigError, ProxyConfig, load_config
from pyproxy.dataplane.nft import NftConfig, render_ruleset, render_update
from pyproxy.model import nodeports
from pyproxy.model.firewall import allowed_sources
from pyproxy.model.localdetect import LocalDetection, pod_networks
from pyproxy.model.objects import InvalidObject, Node, parse_endpoint_slice, parse_node, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable, Verdict
from pyproxy.observe.observer import configz

LB1, LB2 = "1.2.3.4", "5.6.7.8"


def lb_service(ranges: Any = None, ingress: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": "Service", "metadata": {"name": "svc1", "namespace": "ns1"},
        "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.41",
                 "ports": [{"name": "p80", "port": 80, "nodePort": 3001}], **spec},
        "status": {"loadBalancer": {"ingress": ingress if ingress is not None else [{"ip": LB1}, {"ip": LB2}]}},
    }
    if ranges is not None:
        doc["spec"]["loadBalancerSourceRanges"] = ranges
    return doc


def parse(doc: dict[str, Any]) -> tuple[Any, list[str]]:
    reports: list[str] = []
    return parse_service(doc, report=lambda err: reports.append(str(err))), reports


# --- loadBalancerSourceRanges: parsing ---------------------------------------------------------


@pytest.mark.parametrize(("ranges", "parsed", "rejected"), [
    (["192.168.0.0/24", " 203.0.113.0/25"], ("192.168.0.0/24", "203.0.113.0/25"), 0),  # whitespace trimmed
    (["203.0.113.000/025"], ("203.0.113.0/25",), 0),  # kube-proxy's sloppy parse: leading zeros
    (["10.0.0.1/8"], ("10.0.0.0/8",), 0),  # host bits are dropped
    (["not-a-cidr", "10.0.0.0/8"], ("10.0.0.0/8",), 1),  # a bad one is reported, the rest apply
    (["10.0.0.0/33", 7], (), 2),
    (["", "  "], (), 0),  # empty strings are ignored, silently, as kube-proxy does
    (["2001:db8::/64", "10.0.0.0/8"], ("2001:db8::/64", "10.0.0.0/8"), 0),
    ("10.0.0.0/8", (), 1),  # not a list
])
def test_source_ranges_are_parsed_as_kube_proxy_does(ranges: Any, parsed: tuple[str, ...], rejected: int) -> None:
    svc, reports = parse(lb_service(ranges))
    assert svc.source_ranges == parsed
    assert len(reports) == rejected
    assert all(r.startswith("Service ns1/svc1: spec.loadBalancerSourceRanges") for r in reports), reports
    assert svc.load_balancer_ips == (LB1, LB2), "the rest of the Service is still served"


def test_source_ranges_only_matter_for_load_balancers() -> None:
    doc = lb_service(["10.0.0.0/8"])
    doc["spec"]["type"] = "NodePort"
    svc, _ = parse(doc)
    assert svc.source_ranges == ()


# --- the firewall decision ------------------------------------------------------------------------

NODE_IP = "192.168.0.10"


@pytest.mark.parametrize(("ranges", "lb_ip", "node_ips", "allowed"), [
    # kube-proxy's TestLoadBalancer: the node is inside a range, so the LB IPs may be sources too
    (["192.168.0.0/24", "203.0.113.0/25"], LB1, [NODE_IP], ("1.2.3.4/32", "5.6.7.8/32", "192.168.0.0/24",
                                                            "203.0.113.0/25")),
    (["203.0.113.0/25"], LB1, [NODE_IP], ("203.0.113.0/25",)),  # node outside: no LB IP sources
    (["203.0.113.0/25"], LB1, [], ("203.0.113.0/25",)),  # node IP unknown
    (["10.0.0.0/8", "0.0.0.0/0"], LB1, [NODE_IP], None),  # a zero-length range: no firewall
    ([], LB1, [NODE_IP], None),  # no ranges: no firewall
    (["2001:db8::/64"], LB1, [NODE_IP], None),  # ranges of the other family only: none for this IP
    (["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"], LB1, [], ("10.0.0.0/8",)),  # merged: one interval
])
def test_allowed_sources(ranges: list[str], lb_ip: str, node_ips: list[str], allowed: tuple[str, ...] | None) -> None:
    assert allowed_sources(ranges, lb_ip, [LB1, LB2], node_ips) == allowed


def table_for(*docs: dict[str, Any], node: Node | None = None) -> tuple[ServiceTable, ClusterStore]:
    store = ClusterStore()
    services = [parse_service(d) for d in docs]
    store.replace_all([s for s in services if s], [])
    store.set_node(node)
    table = ServiceTable("node1", rng=random.Random(1))
    table.update(store.take_changes(), store, ("192.168.0.10",))
    return table, store


def test_only_load_balancer_ips_are_firewalled() -> None:
    table, _ = table_for(lb_service(["203.0.113.0/25"], externalIPs=["9.9.9.9"]))
    firewalled = {f for v, f in table.all_elements() if v is Verdict.FIREWALL}
    assert firewalled == {(LB1, "TCP", 80), (LB2, "TCP", 80)}, "not the ClusterIP, externalIP or NodePort"
    assert table.all_allows() == {((LB1, "TCP", 80), "203.0.113.0/25"), ((LB2, "TCP", 80), "203.0.113.0/25")}


def test_the_node_ip_from_the_node_object_allows_lb_ip_sources() -> None:
    node = Node("node1", None, False, False, host_ips=(NODE_IP,))
    table, store = table_for(lb_service(["192.168.0.0/24"]), node=node)
    assert ((LB1, "TCP", 80), "1.2.3.4/32") in table.all_allows()
    store.set_node(Node("node1", None, False, False, host_ips=("10.9.9.9",)))  # the node moved out of the range
    table.update(store.take_changes(), store, ("192.168.0.10",))
    added, removed = table.allow_changes
    assert ((LB1, "TCP", 80), "1.2.3.4/32") in removed and not added


def test_firewall_elements_follow_the_ranges_in_updates() -> None:
    table, store = table_for(lb_service(["203.0.113.0/25"]))
    svc = parse_service(lb_service(["0.0.0.0/0"]))
    assert svc is not None
    store.upsert_service(svc.key, svc)
    added, removed = table.update(store.take_changes(), store, ("192.168.0.10",))
    assert {f for v, f in removed if v is Verdict.FIREWALL} == {(LB1, "TCP", 80), (LB2, "TCP", 80)}
    assert not any(v is Verdict.FIREWALL for v, _ in added)
    assert table.allow_changes[1] and not table.all_allows()


def test_firewall_in_nft_text() -> None:
    table, _ = table_for(lb_service(["203.0.113.0/25"]))
    text = render_ruleset(NftConfig(mark=1, tcp_port=1, udp_port=2), table.all_elements(), table.all_allows())
    assert "add element ip pyproxy svc_firewall { 1.2.3.4 . tcp . 80, 5.6.7.8 . tcp . 80 }" in text
    assert ("add element ip pyproxy svc_allow { 1.2.3.4 . tcp . 80 . 203.0.113.0/25, "
            "5.6.7.8 . tcp . 80 . 203.0.113.0/25 }") in text
    # a firewall element is not a verdict: the bridged-frame re-entry set is unchanged by it
    update = render_update([], [(Verdict.FIREWALL, (LB1, "TCP", 80))], [], [((LB1, "TCP", 80), "203.0.113.0/25")])
    assert update == ("delete element ip pyproxy svc_allow { 1.2.3.4 . tcp . 80 . 203.0.113.0/25 }\n"
                      "delete element ip pyproxy svc_firewall { 1.2.3.4 . tcp . 80 }\n")


# --- ipMode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ingress", "captured", "rejected"), [
    ([{"ip": LB1}], (LB1,), 0),  # unset: VIP
    ([{"ip": LB1, "ipMode": "VIP"}], (LB1,), 0),
    ([{"ip": LB1, "ipMode": "Proxy"}, {"ip": LB2}], (LB2,), 0),  # KEP-1860: the LB proxies; not captured
    ([{"ip": LB1, "ipMode": "Tunnel"}], (), 1),  # unknown: reported, and like kube-proxy not captured
    ([{"hostname": "lb.example.com", "ipMode": "Proxy"}], (), 0),
])
def test_ip_mode(ingress: list[dict[str, Any]], captured: tuple[str, ...], rejected: int) -> None:
    svc, reports = parse(lb_service(None, ingress))
    assert svc.load_balancer_ips == captured
    assert len(reports) == rejected
    assert all("ipMode" in r for r in reports)


def test_proxy_mode_ip_is_neither_captured_nor_firewalled() -> None:
    table, _ = table_for(lb_service(["203.0.113.0/25"], [{"ip": LB1, "ipMode": "Proxy"}, {"ip": LB2}]))
    assert {f[0] for _, f in table.all_elements()} == {"172.30.0.41", LB2, "192.168.0.10"}


# --- hints parsing ---------------------------------------------------------------------------------


def test_slice_hints_for_zones_and_nodes() -> None:
    doc = {"kind": "EndpointSlice", "metadata": {"name": "s", "namespace": "ns",
                                                  "labels": {"kubernetes.io/service-name": "svc"}},
           "ports": [{"port": 80}],
           "endpoints": [
               {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]}},
               {"addresses": ["10.0.0.2"], "hints": {"forZones": [], "forNodes": []}},
               {"addresses": ["10.0.0.3"], "hints": {"forNodes": [{"name": 5}]}},
           ]}
    reports: list[InvalidObject] = []
    parsed = parse_endpoint_slice(doc, report=reports.append)
    assert parsed is not None
    first, second = parsed.endpoints
    assert (first.zone_hints, first.node_hints) == (frozenset({"a"}), frozenset({"n1"}))
    assert (second.zone_hints, second.node_hints) == (None, None), "an empty list is no hint"
    assert len(reports) == 1 and "endpoints[2].hints.forNodes[0].name" in str(reports[0])


# --- the Node: pod CIDRs and primary IPs ----------------------------------------------------------


@pytest.mark.parametrize(("spec", "status", "pod_cidrs", "host_ips"), [
    ({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
     {"addresses": [{"type": "Hostname", "address": "node1"}, {"type": "InternalIP", "address": "172.18.0.3"}]},
     ("10.244.1.0/24",), ("172.18.0.3",)),
    ({"podCIDR": "10.244.2.0/24"}, {}, ("10.244.2.0/24",), ()),  # the older single field
    ({}, {"addresses": [{"type": "ExternalIP", "address": "203.0.113.5"},
                        {"type": "InternalIP", "address": "10.0.0.5"}]}, (), ("10.0.0.5",)),  # InternalIP first
    ({"podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
     {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}, {"type": "InternalIP", "address": "10.0.0.6"},
                    {"type": "InternalIP", "address": "fd00::5"}]},
     ("10.244.1.0/24", "fd00:10:244:1::/64"), ("10.0.0.5", "fd00::5")),  # one per family
])
def test_node_pod_cidrs_and_host_ips(spec: dict[str, Any], status: dict[str, Any],
                                     pod_cidrs: tuple[str, ...], host_ips: tuple[str, ...]) -> None:
    node = parse_node({"kind": "Node", "metadata": {"name": "node1"}, "spec": spec, "status": status})
    assert node.pod_cidrs == pod_cidrs
    assert node.host_ips == host_ips


def test_bad_node_addresses_are_reported_and_skipped() -> None:
    reports: list[InvalidObject] = []
    node = parse_node({"kind": "Node", "metadata": {"name": "node1"}, "spec": {"podCIDRs": ["x", "10.244.1.0/24"]},
                       "status": {"addresses": [{"type": "InternalIP", "address": "nope"},
                                                {"type": "InternalIP", "address": "10.0.0.7"}]}},
                      report=reports.append)
    assert node.pod_cidrs == ("10.244.1.0/24",) and node.host_ips == ("10.0.0.7",)
    assert [r.key for r in reports] == ["node1", "node1"]


# --- local detection --------------------------------------------------------------------------------

ROUTES = [("cni0", "10.244.1.0/24"), ("veth1a2b", "10.244.1.7/32"), ("vethc3d4", "10.244.1.8/32"),
          ("eth0", "172.18.0.0/16"), ("eth0", "10.244.2.0/24")]
NODE = Node("node1", None, False, False, pod_cidrs=("10.244.1.0/24",))


@pytest.mark.parametrize(("detection", "node", "expected"), [
    (LocalDetection("ClusterCIDR", cluster_cidrs=("10.244.0.0/16",)), NODE, ["10.244.0.0/16"]),
    (LocalDetection("ClusterCIDR"), NODE, []),  # no cluster CIDR: no pod is detected
    (LocalDetection("NodeCIDR"), NODE, ["10.244.1.0/24"]),
    (LocalDetection("NodeCIDR"), None, []),  # no Node (yet)
    (LocalDetection("NodeCIDR"), Node("node1", None, False, False), []),  # no podCIDRs (yet)
    (LocalDetection("BridgeInterface", bridge_interface="cni0"), NODE, ["10.244.1.0/24"]),
    (LocalDetection("BridgeInterface", bridge_interface="cbr0"), NODE, []),
    (LocalDetection("InterfaceNamePrefix", interface_prefix="veth"), NODE, ["10.244.1.7/32", "10.244.1.8/32"]),
    (LocalDetection("InterfaceNamePrefix", interface_prefix="cali"), NODE, []),
])
def test_pod_networks_by_mode(detection: LocalDetection, node: Node | None, expected: list[str]) -> None:
    assert [str(n) for n in pod_networks(detection, node, ROUTES)] == expected


# --- --nodeport-addresses -----------------------------------------------------------------------------

LOCAL = ["127.0.0.1", "172.18.0.3", "10.244.1.1", "169.254.1.1"]


@pytest.mark.parametrize(("entries", "host_ips", "expected"), [
    ([], ("172.18.0.3",), LOCAL),  # unset: every local address
    (["primary"], ("172.18.0.3",), ["172.18.0.3"]),  # kube-proxy's nftables default
    (["primary"], (), LOCAL),  # no known node IP: primary stands for nothing, so every address
    (["primary"], ("127.0.0.1",), LOCAL),  # a loopback node IP is no primary address
    (["primary", "10.244.0.0/16"], ("172.18.0.3",), ["10.244.1.1", "172.18.0.3"]),
    (["10.244.0.0/16"], (), ["10.244.1.1"]),
    (["all"], ("172.18.0.3",), LOCAL),
    (["10.244.0.0/16", "0.0.0.0/0"], (), LOCAL),
    (["fd00::/8"], (), LOCAL),  # no IPv4 CIDR in the list: every IPv4 address
    (["primary"], ("fd00::5",), LOCAL),  # an IPv6 node: its primary says nothing about IPv4
])
def test_nodeport_addresses(entries: list[str], host_ips: tuple[str, ...], expected: list[str]) -> None:
    assert nodeports.select(LOCAL, entries, host_ips) == sorted(expected)


# --- flags and config ---------------------------------------------------------------------------------


def config_of(*argv: str) -> ProxyConfig:
    return effective_config(build_parser().parse_args(list(argv)))


def test_flags_of_kube_proxy() -> None:
    config = config_of("--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth",
                       "--nodeport-addresses", "primary,10.0.0.0/8")
    assert config.detectLocalMode == "InterfaceNamePrefix"
    assert config.detectLocal.interfaceNamePrefix == "veth"
    assert config.nodePortAddresses == ("primary", "10.0.0.0/8")
    assert config_of("--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cni0"
                     ).detectLocal.bridgeInterface == "cni0"


@pytest.mark.parametrize(("body", "path"), [
    ("detectLocalMode: NodeCidr", "detectLocalMode"),
    ("detectLocalMode: BridgeInterface", "detectLocal.bridgeInterface"),
    ("detectLocalMode: InterfaceNamePrefix", "detectLocal.interfaceNamePrefix"),
    ("detectLocal: {bridgeInterface: 'a b'}", "detectLocal.bridgeInterface"),
    ("nodePortAddresses: [primary, localhost]", "nodePortAddresses[1]"),
])
def test_bad_settings_name_their_field(body: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(f"apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\n{body}\n")
    assert err.value.path == path


def test_configz_serves_the_effective_config_as_kube_proxy_does() -> None:
    config = config_of("--detect-local-mode", "NodeCIDR", "--nodeport-addresses", "primary")
    response = configz(config)
    assert response.status == 200
    assert dict(response.headers) == {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}
    body = json.loads(response.body)
    assert list(body) == ["pyproxy.io"]
    doc = body["pyproxy.io"]
    assert (doc["apiVersion"], doc["kind"]) == ("pyproxy.io/v1alpha1", "PyProxyConfiguration")
    assert doc["detectLocalMode"] == "NodeCIDR" and doc["nodePortAddresses"] == ["primary"]
    assert doc["syncPeriod"] == "30s" and doc["dataplane"]["mark"] == 0x200000


# --- the proxier: waiting for the Node, and the kernel's local_sources -----------------------------


class Recording:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def apply(self, script: str) -> None:
        if script:
            self.scripts.append(script)


def node_cidr_proxier() -> tuple[Any, ClusterStore, Recording]:
    from pyproxy.proxier import Proxier

    store = ClusterStore()
    store.services_synced = store.slices_synced = True
    runner = Recording()
    proxier = Proxier(store=store, table=ServiceTable("node1", rng=random.Random(1)), nft=runner,  # type: ignore[arg-type]
                      nft_config=NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001),
                      node_addresses=lambda: ["192.168.56.101"], detection=LocalDetection("NodeCIDR"), needs_node=True)
    return proxier, store, runner


async def test_node_cidr_waits_for_the_node_then_follows_its_pod_cidrs() -> None:
    proxier, store, runner = node_cidr_proxier()
    await proxier.sync()
    assert runner.scripts == [], "nothing is programmed before the Node has been looked up"
    store.set_node(Node("node1", None, False, False))  # found, but no podCIDRs yet
    await proxier.sync()
    assert len(runner.scripts) == 1 and "set local_sources { type ipv4_addr; flags interval; }" in runner.scripts[0]
    assert not proxier.is_local_source("10.244.1.5") and proxier.is_local_source("192.168.56.101")
    store.set_node(Node("node1", None, False, False, pod_cidrs=("10.244.1.0/24",)))
    await proxier.sync()
    assert "elements = { 10.244.1.0/24 }" in runner.scripts[-1], "a change of pods rewrites the table"
    assert proxier.is_local_source("10.244.1.5") and not proxier.is_local_source("10.244.2.5")
    await proxier.sync()
    assert len(runner.scripts) == 2, "and only a change does"


async def test_interface_modes_read_the_routes_at_every_sync() -> None:
    from pyproxy.proxier import Proxier

    store = ClusterStore()
    store.services_synced = store.slices_synced = True
    runner = Recording()
    views = iter([[("veth1", "10.244.1.7/32")], [("veth1", "10.244.1.7/32"), ("veth2", "10.244.1.8/32")]])
    proxier = Proxier(store=store, table=ServiceTable("node1", rng=random.Random(1)), nft=runner,  # type: ignore[arg-type]
                      nft_config=NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001),
                      node_addresses=lambda: ["192.168.56.101"], interface_routes=lambda: next(views),
                      detection=LocalDetection("InterfaceNamePrefix", interface_prefix="veth"))
    await proxier.sync()
    assert "elements = { 10.244.1.7/32 }" in runner.scripts[0]
    assert proxier.is_local_source("10.244.1.7") and not proxier.is_local_source("10.244.1.8")
    await proxier.sync()  # a new pod's veth: it counts from this sync on
    assert "elements = { 10.244.1.7/32, 10.244.1.8/32 }" in runner.scripts[1]
    assert proxier.is_local_source("10.244.1.8")
