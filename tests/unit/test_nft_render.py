"""Rendering pyproxy's nftables table (pure text; the real `nft` check is in tests/kernel)."""

from __future__ import annotations

import re
from dataclasses import replace

from pyproxy.dataplane.nft import (
    REENTRY_DEVICE,
    REENTRY_MAC,
    SETS,
    NftConfig,
    render_bridge_cleanup,
    render_cleanup,
    render_ruleset,
    render_update,
)
from pyproxy.dataplane.replies import REPLY_MAC, update_lines
from pyproxy.model.table import Element, Verdict

CONFIG = NftConfig(mark=0x1F, tcp_port=15001, udp_port=15002, local_sources=("10.244.0.0/16", "10.250.0.0/16"))
CAP, REJ, DI, DE = Verdict.CAPTURE, Verdict.REJECT, Verdict.DROP_INTERNAL, Verdict.DROP_EXTERNAL
ELEMENTS: set[Element] = {
    (CAP, ("10.96.0.10", "TCP", 80)),
    (CAP, ("10.96.0.53", "UDP", 53)),
    (REJ, ("10.96.0.11", "TCP", 443)),
    (DI, ("10.96.0.12", "TCP", 80)),
    (DE, ("192.168.1.10", "TCP", 30080)),
}


def element_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " element ip " in line and " pyproxy services " not in line]


def reentry_elements(text: str, verb: str) -> set[str]:
    """The elements of `<verb> element netdev pyproxy services { ... }` lines."""
    found: set[str] = set()
    for line in text.splitlines():
        match = re.fullmatch(rf"{verb} element netdev pyproxy services \{{ (.*) \}}", line)
        if match:
            found.update(match[1].split(", "))
    return found


def elements_of(text: str, verb: str) -> dict[str, set[str]]:
    """set name -> elements, from the `<verb> element ip pyproxy <set> { ... }` lines."""
    found: dict[str, set[str]] = {}
    for line in element_lines(text):
        if not line.startswith(f"{verb} "):
            continue
        match = re.fullmatch(rf"{verb} element ip pyproxy (\w+) \{{ (.*) \}}", line)
        assert match, line
        found.setdefault(match[1], set()).update(match[2].split(", "))
    return found


def test_ruleset_owns_its_three_tables_and_nothing_else() -> None:
    text = render_ruleset(CONFIG, ELEMENTS)
    tables = set(re.findall(r"^(?:delete )?table (\w+ \w+)", text, flags=re.M))
    assert tables == {"ip pyproxy", "ip6 pyproxy", "netdev pyproxy"}
    # each table is created (so that delete never fails), deleted, then written whole, in one script
    assert text.startswith("table ip pyproxy\ndelete table ip pyproxy\ntable ip pyproxy {\n")
    assert "\ntable netdev pyproxy\ndelete table netdev pyproxy\ntable netdev pyproxy {\n" in text
    assert "flush ruleset" not in text
    assert not re.search(r"element (?!ip pyproxy |netdev pyproxy services )", text)


def test_ruleset_declares_every_set_and_rules_use_them() -> None:
    text = render_ruleset(CONFIG, ())
    assert set(SETS.values()) == {"svc_capture", "svc_reject", "svc_drop_internal", "svc_drop_external",
                                  "svc_firewall"}
    assert "set svc_allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }" in text
    for name in SETS.values():
        assert f"set {name} {{ type ipv4_addr . inet_proto . inet_service; }}" in text
        assert f"ip daddr . meta l4proto . th dport @{name}" in text
    assert "set local_sources { type ipv4_addr; flags interval; elements = { 10.244.0.0/16, 10.250.0.0/16 }; }" in text
    assert "@local_sources" in text
    assert element_lines(text) == []  # no services: no elements, but the rules are all there


def chain(lines: list[str], name: str) -> list[str]:
    body = lines[lines.index(f"chain {name} {{") + 1:]
    return body[:body.index("}")]


def test_ruleset_rules_and_their_order() -> None:
    lines = [line.strip() for line in render_ruleset(CONFIG, ()).splitlines()]
    match = "ip daddr . meta l4proto . th dport"
    # the hooks' chains: one lookup in `services` for every packet, then Local's reply path
    assert chain(lines, "prerouting") == [
        "type filter hook prerouting priority mangle; policy accept;",
        f"{match} @services jump service_prerouting",
        "socket transparent 1 meta mark set meta mark or 0x1f",
    ]
    assert chain(lines, "output") == [
        "type route hook output priority mangle; policy accept;",
        f"{match} @services jump service_output",
    ]
    assert chain(lines, "service_prerouting") == [
        f"{match} @svc_firewall {match} . ip saddr != @svc_allow drop",
        f"{match} @svc_reject meta l4proto tcp reject with tcp reset",
        f"{match} @svc_reject reject",
        f"{match} @svc_drop_internal drop",
        f"{match} @svc_drop_external fib saddr type != local ip saddr != @local_sources drop",
        f"{match} @svc_capture meta l4proto tcp tproxy to 127.0.0.1:15001 meta mark set meta mark or 0x1f accept",
        f"{match} @svc_capture meta l4proto udp tproxy to 127.0.0.1:15002 meta mark set meta mark or 0x1f accept",
        f"{match} @svc_drop_external meta l4proto tcp tproxy to 127.0.0.1:15001 meta mark set meta mark or 0x1f accept",
        f"{match} @svc_drop_external meta l4proto udp tproxy to 127.0.0.1:15002 meta mark set meta mark or 0x1f accept",
    ]
    out = chain(lines, "service_output")
    assert out[0] == f"{match} @svc_firewall {match} . ip saddr != @svc_allow drop"
    assert out[1] == f"{match} @svc_drop_internal drop"
    assert {line.split(" @")[1].split(" ")[0] for line in out[2:]} == {"svc_capture", "svc_drop_external",
                                                                         "svc_reject"}


def test_the_guard_set_holds_every_frontend_with_a_verdict() -> None:
    """A packet skips the per-service rules unless `services` has its frontend: every element
    of every verdict set must be there (else its verdict is never applied), in its family's table."""
    elements = ELEMENTS | {(Verdict.FIREWALL, ("192.168.1.10", "TCP", 30080)), (CAP, ("fd00:96::10", "TCP", 80))}
    text = render_ruleset(CONFIG, elements)
    guarded = {line for line in text.splitlines() if line.startswith("add element ip pyproxy services ")}
    assert guarded == {"add element ip pyproxy services { 10.96.0.10 . tcp . 80, 10.96.0.11 . tcp . 443, "
                       "10.96.0.12 . tcp . 80, 10.96.0.53 . udp . 53, 192.168.1.10 . tcp . 30080 }"}
    assert "add element ip6 pyproxy services { fd00:96::10 . tcp . 80 }" in text
    assert "set services { type ipv4_addr . inet_proto . inet_service; }" in text
    assert "set services { type ipv6_addr . inet_proto . inet_service; }" in text


def test_an_update_keeps_the_guard_set_in_step() -> None:
    moved: set[Element] = {(CAP, ("10.96.0.11", "TCP", 443))}  # reject -> capture: stays guarded
    text = render_update(moved | {(DE, ("192.168.1.20", "TCP", 30081))},
                         {(REJ, ("10.96.0.11", "TCP", 443)), (CAP, ("10.96.0.99", "UDP", 53))})
    lines = text.splitlines()
    assert "delete element ip pyproxy services { 10.96.0.99 . udp . 53 }" in lines
    assert "add element ip pyproxy services { 192.168.1.20 . tcp . 30081 }" in lines
    assert "10.96.0.11" not in "".join(line for line in lines if " services " in line)


def test_overlapping_local_sources_are_merged() -> None:
    """nft refuses overlapping intervals ("conflicting intervals specified"), which would fail
    every full write; a cluster CIDR list that overlaps is merged instead."""
    config = NftConfig(mark=1, tcp_port=1, udp_port=2,
                       local_sources=("10.244.0.0/16", "10.244.1.0/24", "10.245.0.0/16", "10.245.0.0/16"))
    assert "elements = { 10.244.0.0/15 }" in render_ruleset(config, ())


def test_ruleset_without_local_sources_has_an_empty_set() -> None:
    text = render_ruleset(NftConfig(mark=1, tcp_port=1, udp_port=2), ())
    assert "set local_sources { type ipv4_addr; flags interval; }" in text


def test_ruleset_elements_land_in_their_verdicts_sets() -> None:
    text = render_ruleset(CONFIG, ELEMENTS)
    assert elements_of(text, "add") == {
        "svc_capture": {"10.96.0.10 . tcp . 80", "10.96.0.53 . udp . 53"},
        "svc_reject": {"10.96.0.11 . tcp . 443"},
        "svc_drop_internal": {"10.96.0.12 . tcp . 80"},
        "svc_drop_external": {"192.168.1.10 . tcp . 30080"},
    }
    # elements come after the table definition that declares their sets
    assert text.index("add element") > text.index("chain output")


def test_ruleset_is_deterministic() -> None:
    assert render_ruleset(CONFIG, ELEMENTS) == render_ruleset(CONFIG, list(reversed(sorted(ELEMENTS, key=str))))


def test_elements_are_chunked() -> None:
    many: set[Element] = {(CAP, (f"10.96.{i // 250}.{i % 250 + 1}", "TCP", 80)) for i in range(2500)}
    text = render_update(many, ())
    lines = element_lines(text)
    assert len(lines) == 3
    counts = [line.count(" . tcp . ") for line in lines]
    assert counts == [1000, 1000, 500]
    assert sum(len(v) for v in elements_of(text, "add").values()) == 2500


def test_update_touches_only_elements() -> None:
    added: set[Element] = {(CAP, ("10.96.0.11", "TCP", 443))}
    removed: set[Element] = {(REJ, ("10.96.0.11", "TCP", 443)), (CAP, ("10.96.0.99", "UDP", 53))}
    text = render_update(added, removed)
    assert all(re.fullmatch(r"(add|delete) element (ip pyproxy \w+|netdev pyproxy services) \{ .* \}", line)
               for line in text.splitlines())
    assert elements_of(text, "delete") == {"svc_reject": {"10.96.0.11 . tcp . 443"},
                                           "svc_capture": {"10.96.0.99 . udp . 53"}}
    assert elements_of(text, "add") == {"svc_capture": {"10.96.0.11 . tcp . 443"}}
    # deletes first: an element moving between sets never sits in two at once
    assert text.index("delete element") < text.index("add element")
    assert "table ip pyproxy {" not in text and "chain" not in text


def test_empty_update_is_empty() -> None:
    assert render_update((), ()) == ""


def test_cleanup_removes_only_our_tables() -> None:
    assert render_cleanup() == ("table ip pyproxy\ndelete table ip pyproxy\n"
                                "table ip6 pyproxy\ndelete table ip6 pyproxy\n"
                                "table netdev pyproxy\ndelete table netdev pyproxy\n")


BRIDGED = NftConfig(mark=0x1F, tcp_port=15001, udp_port=15002, pod_bridges=("cni0", "cbr0"))


def test_reentry_chain_hooks_the_pod_bridges_and_forwards_service_frames() -> None:
    lines = [line.strip() for line in render_ruleset(BRIDGED, ()).splitlines()]
    chain = lines[lines.index("chain pod_bridges {") + 1:]
    assert chain[:4] == [
        'type filter hook ingress devices = { "cni0", "cbr0" } priority -500; policy accept;',
        f'ip daddr . meta l4proto . th dport @services ether daddr set {REENTRY_MAC} fwd to "{REENTRY_DEVICE}"',
        f'ip6 daddr . meta l4proto . th dport @services6 ether daddr set {REENTRY_MAC} fwd to "{REENTRY_DEVICE}"',
        "}",
    ]
    assert "set services { type ipv4_addr . inet_proto . inet_service; }" in lines
    assert "set services6 { type ipv6_addr . inet_proto . inet_service; }" in lines


def test_no_pod_bridges_no_reentry_chain() -> None:
    text = render_ruleset(CONFIG, ELEMENTS)
    assert "table netdev pyproxy {" in text and "chain pod_bridges" not in text and "fwd" not in text


def test_reentry_set_holds_every_frontend_of_every_verdict() -> None:
    text = render_ruleset(BRIDGED, ELEMENTS)
    assert reentry_elements(text, "add") == {f"{ip} . {proto.lower()} . {port}" for _, (ip, proto, port) in ELEMENTS}
    assert text.index("add element netdev") > text.index("chain pod_bridges")


def test_update_keeps_a_frontend_that_only_changes_verdict_in_the_reentry_set() -> None:
    added: set[Element] = {(CAP, ("10.96.0.11", "TCP", 443)), (CAP, ("10.96.0.20", "TCP", 80))}
    removed: set[Element] = {(REJ, ("10.96.0.11", "TCP", 443)), (CAP, ("10.96.0.99", "UDP", 53))}
    text = render_update(added, removed)
    assert reentry_elements(text, "delete") == {"10.96.0.99 . udp . 53"}
    assert reentry_elements(text, "add") == {"10.96.0.20 . tcp . 80"}
    assert "chain" not in text


def test_reentering_frames_carry_the_reentry_mark_before_they_are_forwarded() -> None:
    config = NftConfig(mark=0x200000, tcp_port=15001, udp_port=15001, pod_bridges=("cni0",), reentry_mark=0x400000)
    rule = next(line.strip() for line in render_ruleset(config, ()).splitlines() if "fwd to" in line)
    assert rule == (f"ip daddr . meta l4proto . th dport @services meta mark set mark or 0x400000 "
                    f'ether daddr set {REENTRY_MAC} fwd to "{REENTRY_DEVICE}"')


DUAL = NftConfig(mark=0x1F, tcp_port=15001, udp_port=15002,
                 local_sources=("10.244.0.0/16", "fd00:244::/56", "fd00:244:0:1::/64"))
DUAL_ELEMENTS: set[Element] = {
    (CAP, ("10.96.0.10", "TCP", 80)),
    (CAP, ("fd00:96::10", "TCP", 80)),
    (REJ, ("fd00:96::11", "UDP", 53)),
    (DE, ("fd00:56::101", "TCP", 30080)),
}


def _table(text: str, family: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"table {family} pyproxy {{")
    return [line.strip() for line in lines[start:lines.index("}", start) + 1]]  # its own "}" is unindented


def test_each_family_has_its_own_table_with_its_own_listener_and_types() -> None:
    text = render_ruleset(DUAL, DUAL_ELEMENTS)
    v4, v6 = _table(text, "ip"), _table(text, "ip6")
    assert "set svc_capture { type ipv6_addr . inet_proto . inet_service; }" in v6
    assert "set svc_capture { type ipv4_addr . inet_proto . inet_service; }" in v4
    assert ("ip6 daddr . meta l4proto . th dport @svc_capture meta l4proto tcp tproxy to [::1]:15001 "
            "meta mark set meta mark or 0x1f accept") in v6
    assert ("ip6 daddr . meta l4proto . th dport @svc_capture meta l4proto udp tproxy to [::1]:15002 "
            "meta mark set meta mark or 0x1f accept") in v6
    assert ("ip6 daddr . meta l4proto . th dport @svc_drop_external fib saddr type != local "
            "ip6 saddr != @local_sources drop") in v6
    assert not [line for line in v6 if "ip daddr" in line or "127.0.0.1" in line]
    assert not [line for line in v4 if "ip6 " in line or "[::1]" in line]
    # the same chains in both: the rules differ only by the family's words
    assert len(v4) == len(v6)


def test_local_sources_are_split_by_family_and_merged() -> None:
    text = render_ruleset(DUAL, ())
    assert "set local_sources { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 }; }" in _table(text, "ip")
    assert ("set local_sources { type ipv6_addr; flags interval; elements = { fd00:244::/56 }; }"
            in _table(text, "ip6"))


def test_elements_go_to_the_table_of_their_family() -> None:
    text = render_ruleset(DUAL, DUAL_ELEMENTS)
    lines = [line for line in text.splitlines() if " element " in line]
    assert "add element ip pyproxy svc_capture { 10.96.0.10 . tcp . 80 }" in lines
    assert "add element ip6 pyproxy svc_capture { fd00:96::10 . tcp . 80 }" in lines
    assert "add element ip6 pyproxy svc_reject { fd00:96::11 . udp . 53 }" in lines
    assert "add element ip6 pyproxy svc_drop_external { fd00:56::101 . tcp . 30080 }" in lines
    assert "add element netdev pyproxy services { 10.96.0.10 . tcp . 80 }" in lines
    assert ("add element netdev pyproxy services6 { fd00:56::101 . tcp . 30080, fd00:96::10 . tcp . 80, "
            "fd00:96::11 . udp . 53 }") in lines
    update = render_update({(REJ, ("fd00:96::10", "TCP", 80))}, {(CAP, ("fd00:96::10", "TCP", 80))})
    assert update.splitlines() == [
        "delete element ip6 pyproxy svc_capture { fd00:96::10 . tcp . 80 }",
        "add element ip6 pyproxy svc_reject { fd00:96::10 . tcp . 80 }",
    ]  # a verdict change keeps the re-entry element


def test_no_pod_bridges_no_bridge_table() -> None:
    """A routed node needs no bridge family (a kernel may lack it)."""
    assert "bridge" not in render_ruleset(CONFIG, ELEMENTS, steered=[("10.244.1.5", "TCP", 80)])


def test_the_bridge_table_sends_steered_endpoints_replies_up_to_the_node() -> None:
    config = replace(BRIDGED, bridge_subnets=("10.244.1.0/24", "fd00:244:1::/64", "10.88.0.0/16"))
    text = render_ruleset(config, (), steered=[("10.244.1.5", "TCP", 80), ("10.244.1.5", "UDP", 53),
                                               ("fd00:244:1::5", "TCP", 80)])
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index("table bridge pyproxy {")
    assert lines[start - 2:start] == ["table bridge pyproxy", "delete table bridge pyproxy"]
    assert "set bridged { type ipv4_addr; flags interval; elements = { 10.244.1.0/24, 10.88.0.0/16 }; }" in lines
    assert "set bridged6 { type ipv6_addr; flags interval; elements = { fd00:244:1::/64 }; }" in lines
    chain = lines[lines.index("chain prerouting {", start) + 1:]
    up = f"ether daddr set {REPLY_MAC} meta pkttype set host"
    assert chain[:6] == [
        "type filter hook prerouting priority -300; policy accept;",
        f"meta pkttype other ip saddr . meta l4proto . th sport @steer ip daddr @bridged {up}",
        f"meta pkttype other ip frag-off & 0x3fff != 0 ip saddr @steer_hosts ip daddr @bridged {up}",
        f"meta pkttype other ip6 saddr . meta l4proto . th sport @steer6 ip6 daddr @bridged6 {up}",
        f"meta pkttype other exthdr frag exists ip6 saddr @steer_hosts6 ip6 daddr @bridged6 {up}",
        "}",
    ]
    assert lines[-4:] == [
        "add element bridge pyproxy steer { 10.244.1.5 . tcp . 80, 10.244.1.5 . udp . 53 }",
        "add element bridge pyproxy steer6 { fd00:244:1::5 . tcp . 80 }",
        "add element bridge pyproxy steer_hosts { 10.244.1.5 }",
        "add element bridge pyproxy steer_hosts6 { fd00:244:1::5 }",
    ]


def test_steering_updates_keep_a_host_while_any_of_its_ports_is_steered() -> None:
    before = frozenset({("10.244.1.5", "TCP", 80), ("10.244.1.5", "UDP", 53), ("10.244.1.6", "TCP", 80)})
    after = frozenset({("10.244.1.5", "TCP", 80), ("10.244.1.7", "TCP", 80)})
    assert update_lines(before, after) == [
        "delete element bridge pyproxy steer { 10.244.1.5 . udp . 53, 10.244.1.6 . tcp . 80 }",
        "delete element bridge pyproxy steer_hosts { 10.244.1.6 }",
        "add element bridge pyproxy steer { 10.244.1.7 . tcp . 80 }",
        "add element bridge pyproxy steer_hosts { 10.244.1.7 }",
    ]
    assert update_lines(after, after) == []
    text = render_update((), (), steered_before=before, steered=after)
    assert text == "\n".join(update_lines(before, after)) + "\n"


def test_cleanup_of_the_bridge_table_is_its_own() -> None:
    assert render_bridge_cleanup() == "table bridge pyproxy\ndelete table bridge pyproxy\n"
