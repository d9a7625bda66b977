"""pyproxy's nftables tables: rendering them (pure) and applying them (`nft -f -`, the only I/O).

Rules kept here (DATAPLANE.md):
- pyproxy owns exactly four tables, `ip pyproxy` and `ip6 pyproxy` (one per address
  family, rendered from one template: the same sets and chains, each family's frontends
  in its own table; TPROXY to the proxy's listener of that family, 127.0.0.1 or ::1),
  `netdev pyproxy` (pods on a bridge, below, with one set per family) and, on a node with
  pod bridges, `bridge pyproxy` (replies.py: same-bridge endpoints' replies go up to the
  node), and touches nothing else.
- The rules never change while running (but for the pod bridges' hook devices, below);
  services come and go as set elements:
  `capture` (TPROXY to the proxy), `reject` (no endpoints: TCP reset / ICMP unreachable),
  `drop_internal` and `drop_external` (Local policy without a local endpoint; external
  drops spare the node itself and `local_sources`, i.e. the cluster CIDR, whose traffic
  is captured and served from the cluster set: kube-proxy's short-circuit).
- Every packet the node receives or sends meets these hooks, the proxy's own relayed
  traffic included, so a packet to anything but a service frontend must cost little: the
  set `services` (every frontend with a verdict, the same keys as the re-entry sets) is
  one lookup that guards the per-service rules, which live in the regular chains
  `service_prerouting` and `service_output` (without it every packet paid nine set
  lookups in prerouting and six in output: about 7 % of the proxy's CPU in an rr
  profile). A firewalled frontend always has a verdict too (table.py), so its check is
  behind the guard as well.
- Order in prerouting: the source-range firewall, then refusals and drops, then capture
  (all behind the guard), then `socket transparent` (the reply path of Local mode, whose
  packets go to client addresses, not frontends; before the capture rules it would steal
  new UDP queries).
- Source ranges (model/firewall.py): a packet to a `svc_firewall` frontend whose
  (frontend . source) is not in the interval set `svc_allow` is dropped, first thing in
  prerouting and in output (the node's own traffic is checked too, as kube-proxy does).
  Like the other sets, both change only by elements. Every packet is checked, not only a
  connection's first (pyproxy keeps no conntrack state): a source taken out of the ranges
  loses its open connections too.
- An output `route` chain marks the node's own traffic to service addresses so that the
  policy route sends it through `lo` and back into prerouting.
- A full write replaces every table atomically; an incremental write only adds and deletes
  elements. A failed incremental write is answered by a full write.

Pods on a Linux bridge (DATAPLANE): with `net.bridge.bridge-nf-call-iptables=1`
(br_netfilter), a pod's frame to its gateway runs the IPv4 PREROUTING hooks from the
bridge's own prerouting; TPROXY assigns the listener and sets the mark there, but `ip_rcv`
then orphans the skb (the assignment is gone) and br_netfilter skips the IP layer's own
PREROUTING pass, so TCP/UDP find no socket for ClusterIP:port and the client times out
(drop reason NO_SOCKET in tcp_v4_rcv). nft's bridge `meta broute` would avoid that pass,
but is missing from common kernels (CONFIG_NFT_BRIDGE_META) and from nft 1.0.6. So
pyproxy owns a second table, `netdev pyproxy`: an ingress chain on the pod bridges
(`pod_bridges`: the ones that exist, as the proxier reads them at each sync) forwards frames
whose destination is a service address into pyproxy's own veth pair (`fwd to`
REENTRY_DEVICE, destination MAC set to its peer's). A veth scrubs the skb (br_netfilter's
state, the fake route), so the frame re-enters the IP stack on the peer like any routed
pod's packet and meets the same rules here. Its set `services` holds every service
address of every verdict, written in the same transaction as the `ip pyproxy` sets.
Re-entering frames also get `reentry_mark`: with strict reverse-path filtering
(`rp_filter=1`, which kind's nodes and many distributions set) a pod's packet arriving on
REENTRY_PEER is dropped, since the pod's route points at the bridge; routing.py gives
marked packets a reverse-path route through REENTRY_PEER.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyproxy.dataplane import replies
from pyproxy.model.source import Steer
from pyproxy.model.family import Family, family_of
from pyproxy.model.table import Allow, Element, Verdict

TABLE = "pyproxy"
REENTRY_DEVICE = "pyproxy-fwd"  # the veth pyproxy forwards bridged service frames into
REENTRY_PEER = "pyproxy-in"  # its peer, where they enter the IP stack again
REENTRY_MAC = "02:70:79:70:78:01"  # the peer's fixed (locally administered) address
REENTRY_ADDRESS = "169.254.77.1"  # the peer's /32 (link-local): loose rp_filter wants one
SETS = {verdict: f"svc_{verdict.value}" for verdict in Verdict}
ALLOW_SET = "svc_allow"  # (frontend . source CIDR) pairs that may pass the firewall
SERVICES_SET = "services"  # every frontend with a verdict: the guard in front of the per-service rules


@dataclass(frozen=True)
class FamilyRules:
    """What differs between the `ip` and the `ip6` table; everything else is one template."""

    family: Family
    address_type: str  # nft's type of one address
    header: str  # the expression of the destination address
    listener: str  # where TPROXY sends captured packets (the proxy's listener of this family)
    reentry_set: str  # the name of this family's set in the `netdev pyproxy` table

    @property
    def table(self) -> str:
        return self.family.nft

    @property
    def set_type(self) -> str:
        return f"{self.address_type} . inet_proto . inet_service"

    @property
    def match(self) -> str:
        return f"{self.header} daddr . meta l4proto . th dport"

    @property
    def firewall_rule(self) -> str:
        """Source ranges: a firewalled frontend drops what no (frontend . source) Allow holds."""
        return f"{self.match} @{SETS[Verdict.FIREWALL]} {self.match} . {self.header} saddr != @{ALLOW_SET} drop"


FAMILIES = {
    Family.IPV4: FamilyRules(Family.IPV4, "ipv4_addr", "ip", "127.0.0.1", "services"),
    Family.IPV6: FamilyRules(Family.IPV6, "ipv6_addr", "ip6", "[::1]", "services6"),
}


@dataclass(frozen=True)
class NftConfig:
    mark: int
    tcp_port: int
    udp_port: int
    local_sources: tuple[str, ...] = ()  # CIDRs (both families) whose traffic counts as "from this cluster"
    pod_bridges: tuple[str, ...] = ()  # existing bridges pods hang off (re-entry chain); none: no chain
    reentry_mark: int = 0  # set on re-entering frames (routing.py: their reverse-path route); 0: none
    bridge_subnets: tuple[str, ...] = ()  # the pod bridges' subnets, both families (replies.py)


def render_ruleset(config: NftConfig, elements: Iterable[Element], allows: Iterable[Allow] = (),
                   steered: Iterable[Steer] = ()) -> str:
    """Every table, each replacing its previous version, all in one transaction; the
    `bridge pyproxy` table (replies.py, with the endpoints `steered`) only with pod bridges."""
    lines = [line for rules in FAMILIES.values() for line in _render_family(config, rules)]
    lines += _render_reentry(config)
    if config.pod_bridges:
        lines += replies.render_table(config.bridge_subnets, steered)
    elements = list(elements)
    keys = _keys(elements)
    lines += _element_lines("add", elements) + _services_lines("add", keys) + _reentry_lines("add", keys)
    lines += _allow_lines("add", allows)
    return "\n".join(lines) + "\n"


def _local_sources(config: NftConfig, family: Family) -> str:
    # nft refuses overlapping intervals in one set: merge the CIDRs first
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in config.local_sources]
    merged: Iterable[object]
    if family is Family.IPV6:
        merged = ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network))
    else:
        merged = ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network))
    return ", ".join(str(net) for net in merged)


def _render_family(config: NftConfig, rules: FamilyRules) -> list[str]:
    """The `ip pyproxy` or `ip6 pyproxy` table: the same chains, in that family's words."""
    mark = f"0x{config.mark:x}"
    set_mark = f"meta mark set meta mark or {mark}"
    match, table, header = rules.match, rules.table, rules.header
    local_sources = _local_sources(config, rules.family)
    sets = "\n".join(f"    set {name} {{ type {rules.set_type}; }}" for name in SETS.values())
    return [
        f"table {table} {TABLE}",
        f"delete table {table} {TABLE}",
        f"table {table} {TABLE} {{",
        sets,
        f"    set {SERVICES_SET} {{ type {rules.set_type}; }}",
        f"    set {ALLOW_SET} {{ type {rules.set_type} . {rules.address_type}; flags interval; }}",
        f"    set local_sources {{ type {rules.address_type}; flags interval; "
        + (f"elements = {{ {local_sources} }}; " if local_sources else "")
        + "}",
        "    chain prerouting {",
        "        type filter hook prerouting priority mangle; policy accept;",
        f"        {match} @{SERVICES_SET} jump service_prerouting",
        f"        socket transparent 1 {set_mark}",
        "    }",
        "    chain service_prerouting {",
        f"        {rules.firewall_rule}",
        f"        {match} @svc_reject meta l4proto tcp reject with tcp reset",
        f"        {match} @svc_reject reject",
        f"        {match} @svc_drop_internal drop",
        f"        {match} @svc_drop_external fib saddr type != local {header} saddr != @local_sources drop",
        *(
            f"        {match} @{name} meta l4proto {proto} tproxy to {rules.listener}:{port} {set_mark} accept"
            for name in ("svc_capture", "svc_drop_external")
            for proto, port in (("tcp", config.tcp_port), ("udp", config.udp_port))
        ),
        "    }",
        "    chain output {",
        "        type route hook output priority mangle; policy accept;",
        f"        {match} @{SERVICES_SET} jump service_output",
        "    }",
        "    chain service_output {",
        f"        {rules.firewall_rule}",
        f"        {match} @svc_drop_internal drop",
        # the node's own UDP to a service without endpoints: an ICMP error cannot come back
        # through lo, so refuse it here (send() fails at once) rather than let it time out
        f"        {match} @svc_reject meta l4proto udp reject",
        f"        {match} @svc_capture {set_mark}",
        f"        {match} @svc_drop_external {set_mark}",
        f"        {match} @svc_reject {set_mark}",
        "    }",
        "}",
    ]


def _render_reentry(config: NftConfig) -> list[str]:
    """The `netdev pyproxy` table: bridged frames to service addresses go to REENTRY_DEVICE."""
    lines = [
        f"table netdev {TABLE}",
        f"delete table netdev {TABLE}",
        f"table netdev {TABLE} {{",
        *(f"    set {rules.reentry_set} {{ type {rules.set_type}; }}" for rules in FAMILIES.values()),
    ]
    if config.pod_bridges:
        devices = ", ".join(f'"{name}"' for name in config.pod_bridges)
        lines += [
            "    chain pod_bridges {",
            f"        type filter hook ingress devices = {{ {devices} }} priority -500; policy accept;",
            *(
                f"        {rules.match} @{rules.reentry_set}{_reentry_mark(config)} ether daddr set {REENTRY_MAC}"
                f' fwd to "{REENTRY_DEVICE}"'
                for rules in FAMILIES.values()
            ),
            "    }",
        ]
    return lines + ["}"]


def _reentry_mark(config: NftConfig) -> str:
    return f" meta mark set mark or {config.reentry_mark:#x}" if config.reentry_mark else ""


def render_update(added: Iterable[Element], removed: Iterable[Element],
                  allows_added: Iterable[Allow] = (), allows_removed: Iterable[Allow] = (),
                  steered_before: frozenset[Steer] = frozenset(), steered: frozenset[Steer] = frozenset()) -> str:
    """An incremental transaction: only set elements change (the `bridge pyproxy` table's
    from `steered_before` to `steered`, when those differ: only a node with pod bridges has it)."""
    added, removed = list(added), list(removed)
    # a frontend that only changes verdict stays in the services and re-entry sets
    keys_added, keys_removed = _keys(added), _keys(removed)
    lines = _allow_lines("delete", allows_removed)
    lines += _element_lines("delete", removed) + _element_lines("add", added)
    gone, new = keys_removed - keys_added, keys_added - keys_removed
    lines += _services_lines("delete", gone) + _services_lines("add", new)
    lines += _reentry_lines("delete", gone) + _reentry_lines("add", new)
    lines += _allow_lines("add", allows_added)
    lines += replies.update_lines(steered_before, steered)
    return "\n".join(lines) + "\n" if lines else ""


def render_cleanup() -> str:
    """The tables every node has (the bridge family's is `render_bridge_cleanup`'s: a
    kernel without it must still clean up the rest)."""
    return "".join(f"table {family} {TABLE}\ndelete table {family} {TABLE}\n" for family in ("ip", "ip6", "netdev"))


def render_bridge_cleanup() -> str:
    return f"table bridge {TABLE}\ndelete table bridge {TABLE}\n"


def _keys(elements: Iterable[Element]) -> set[tuple[str, str, int]]:
    """The frontends the elements give a verdict (a FIREWALL element only guards one)."""
    return {key for verdict, key in elements if verdict is not Verdict.FIREWALL}


def _allow_lines(verb: str, allows: Iterable[Allow]) -> list[str]:
    by_table: dict[str, list[str]] = {}
    for (ip, protocol, port), cidr in sorted(allows):
        by_table.setdefault(family_of(ip).nft, []).append(f"{_item(ip, protocol, port)} . {cidr}")
    return [line for table, items in sorted(by_table.items())
            for line in _chunks(verb, f"{table} {TABLE} {ALLOW_SET}", items)]


def _item(ip: str, protocol: str, port: int) -> str:
    return f"{ip} . {protocol.lower()} . {port}"


def _chunks(verb: str, target: str, items: list[str]) -> list[str]:
    return [f"{verb} element {target} {{ {', '.join(items[start:start + 1000])} }}"
            for start in range(0, len(items), 1000)]


def _services_lines(verb: str, keys: set[tuple[str, str, int]]) -> list[str]:
    return _key_lines(verb, keys, lambda family: f"{family.nft} {TABLE} {SERVICES_SET}")


def _reentry_lines(verb: str, keys: set[tuple[str, str, int]]) -> list[str]:
    return _key_lines(verb, keys, lambda family: f"netdev {TABLE} {FAMILIES[family].reentry_set}")


def _key_lines(verb: str, keys: set[tuple[str, str, int]], target: Callable[[Family], str]) -> list[str]:
    """`verb` the frontends `keys` in the set `target` names for each one's family."""
    by_target: dict[str, list[str]] = {}
    for ip, protocol, port in sorted(keys):
        by_target.setdefault(target(family_of(ip)), []).append(_item(ip, protocol, port))
    return [line for name, items in sorted(by_target.items()) for line in _chunks(verb, name, items)]


def _element_lines(verb: str, elements: Iterable[Element]) -> list[str]:
    by_set: dict[tuple[str, str], list[str]] = {}
    for verdict, (ip, protocol, port) in sorted(elements, key=lambda e: (e[0].value, e[1])):
        by_set.setdefault((family_of(ip).nft, SETS[verdict]), []).append(_item(ip, protocol, port))
    return [line for (table, name), items in sorted(by_set.items())
            for line in _chunks(verb, f"{table} {TABLE} {name}", items)]


class NftError(RuntimeError):
    pass


class NftRunner:
    """Runs one `nft -f -` transaction. Swappable for a fake in unit tests."""

    def __init__(self, binary: str = "nft") -> None:
        self.binary = binary

    async def apply(self, script: str) -> None:
        if not script:
            return
        proc = await asyncio.create_subprocess_exec(
            self.binary, "-f", "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await proc.communicate(script.encode())
        if proc.returncode != 0:
            raise NftError(stderr.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
