"""pyproxy's nftables tables: rendering them (pure) and applying them (`nft -f -`, the only I/O).

Rules kept here (DATAPLANE.md):
- pyproxy owns exactly two tables, `ip pyproxy` and `netdev pyproxy` (pods on a bridge,
  below), and touches nothing else.
- The rules never change while running (but for the pod bridges' hook devices, below);
  services come and go as set elements:
  `capture` (TPROXY to the proxy), `reject` (no endpoints: TCP reset / ICMP unreachable),
  `drop_internal` and `drop_external` (Local policy without a local endpoint; external
  drops spare the node itself and `local_sources`, i.e. the cluster CIDR, whose traffic
  is captured and served from the cluster set: kube-proxy's short-circuit).
- Order in prerouting: the source-range firewall, then refusals and drops, then capture,
  then `socket transparent` (the reply path of Local mode; before the capture rules it
  would steal new UDP queries).
- Source ranges (model/firewall.py): a packet to a `svc_firewall` frontend whose
  (frontend . source) is not in the interval set `svc_allow` is dropped, first thing in
  prerouting and in output (the node's own traffic is checked too, as kube-proxy does).
  Like the other sets, both change only by elements. Every packet is checked, not only a
  connection's first (pyproxy keeps no conntrack state): a source taken out of the ranges
  loses its open connections too.
- An output `route` chain marks the node's own traffic to service addresses so that the
  policy route sends it through `lo` and back into prerouting.
- A full write replaces both tables atomically; an incremental write only adds and deletes
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
from collections.abc import Iterable
from dataclasses import dataclass

from pyproxy.model.table import Allow, Element, Verdict

TABLE = "pyproxy"
REENTRY_DEVICE = "pyproxy-fwd"  # the veth pyproxy forwards bridged service frames into
REENTRY_PEER = "pyproxy-in"  # its peer, where they enter the IPv4 stack again
REENTRY_MAC = "02:70:79:70:78:01"  # the peer's fixed (locally administered) address
REENTRY_ADDRESS = "169.254.77.1"  # the peer's /32 (link-local): loose rp_filter wants one
SET_TYPE = "ipv4_addr . inet_proto . inet_service"
MATCH = "ip daddr . meta l4proto . th dport"
SETS = {verdict: f"svc_{verdict.value}" for verdict in Verdict}
ALLOW_SET = "svc_allow"  # (frontend . source CIDR) pairs that may pass the firewall
ALLOW_SET_TYPE = f"{SET_TYPE} . ipv4_addr"
ALLOW_MATCH = f"{MATCH} . ip saddr"
FIREWALL_RULE = f"{MATCH} @{SETS[Verdict.FIREWALL]} {ALLOW_MATCH} != @{ALLOW_SET} drop"


@dataclass(frozen=True)
class NftConfig:
    mark: int
    tcp_port: int
    udp_port: int
    local_sources: tuple[str, ...] = ()  # CIDRs whose traffic counts as "from this cluster"
    pod_bridges: tuple[str, ...] = ()  # existing bridges pods hang off (re-entry chain); none: no chain
    reentry_mark: int = 0  # set on re-entering frames (routing.py: their reverse-path route); 0: none


def render_ruleset(config: NftConfig, elements: Iterable[Element], allows: Iterable[Allow] = ()) -> str:
    """The whole table, replacing any previous one in the same transaction."""
    mark = f"0x{config.mark:x}"
    set_mark = f"meta mark set meta mark or {mark}"
    # nft refuses overlapping intervals in one set: merge the CIDRs first
    local_sources = ", ".join(
        str(net) for net in ipaddress.collapse_addresses(
            ipaddress.IPv4Network(cidr, strict=False) for cidr in config.local_sources
        )
    )
    sets = "\n".join(f"    set {name} {{ type {SET_TYPE}; }}" for name in SETS.values())
    lines = [
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        sets,
        f"    set {ALLOW_SET} {{ type {ALLOW_SET_TYPE}; flags interval; }}",
        "    set local_sources { type ipv4_addr; flags interval; "
        + (f"elements = {{ {local_sources} }}; " if local_sources else "")
        + "}",
        "    chain prerouting {",
        "        type filter hook prerouting priority mangle; policy accept;",
        f"        {FIREWALL_RULE}",
        f"        {MATCH} @svc_reject meta l4proto tcp reject with tcp reset",
        f"        {MATCH} @svc_reject reject",
        f"        {MATCH} @svc_drop_internal drop",
        f"        {MATCH} @svc_drop_external fib saddr type != local ip saddr != @local_sources drop",
        *(
            f"        {MATCH} @{name} meta l4proto {proto} tproxy to 127.0.0.1:{port} {set_mark} accept"
            for name in ("svc_capture", "svc_drop_external")
            for proto, port in (("tcp", config.tcp_port), ("udp", config.udp_port))
        ),
        f"        socket transparent 1 {set_mark}",
        "    }",
        "    chain output {",
        "        type route hook output priority mangle; policy accept;",
        f"        {FIREWALL_RULE}",
        f"        {MATCH} @svc_drop_internal drop",
        # the node's own UDP to a service without endpoints: an ICMP error cannot come back
        # through lo, so refuse it here (send() fails at once) rather than let it time out
        f"        {MATCH} @svc_reject meta l4proto udp reject",
        f"        {MATCH} @svc_capture {set_mark}",
        f"        {MATCH} @svc_drop_external {set_mark}",
        f"        {MATCH} @svc_reject {set_mark}",
        "    }",
        "}",
        *_render_reentry(config),
    ]
    elements = list(elements)
    lines += _element_lines("add", elements) + _reentry_lines("add", _keys(elements))
    lines += _allow_lines("add", allows)
    return "\n".join(lines) + "\n"


def _render_reentry(config: NftConfig) -> list[str]:
    """The `netdev pyproxy` table: bridged frames to service addresses go to REENTRY_DEVICE."""
    lines = [
        f"table netdev {TABLE}",
        f"delete table netdev {TABLE}",
        f"table netdev {TABLE} {{",
        f"    set services {{ type {SET_TYPE}; }}",
    ]
    if config.pod_bridges:
        devices = ", ".join(f'"{name}"' for name in config.pod_bridges)
        lines += [
            "    chain pod_bridges {",
            f"        type filter hook ingress devices = {{ {devices} }} priority -500; policy accept;",
            f"        {MATCH} @services{_reentry_mark(config)} ether daddr set {REENTRY_MAC}"
            f' fwd to "{REENTRY_DEVICE}"',
            "    }",
        ]
    return lines + ["}"]


def _reentry_mark(config: NftConfig) -> str:
    return f" meta mark set mark or {config.reentry_mark:#x}" if config.reentry_mark else ""


def render_update(added: Iterable[Element], removed: Iterable[Element],
                  allows_added: Iterable[Allow] = (), allows_removed: Iterable[Allow] = ()) -> str:
    """An incremental transaction: only set elements change."""
    added, removed = list(added), list(removed)
    # a frontend that only changes verdict stays in the re-entry set
    keys_added, keys_removed = _keys(added), _keys(removed)
    lines = _allow_lines("delete", allows_removed)
    lines += _element_lines("delete", removed) + _element_lines("add", added)
    lines += _reentry_lines("delete", keys_removed - keys_added) + _reentry_lines("add", keys_added - keys_removed)
    lines += _allow_lines("add", allows_added)
    return "\n".join(lines) + "\n" if lines else ""


def render_cleanup() -> str:
    return "".join(f"table {family} {TABLE}\ndelete table {family} {TABLE}\n" for family in ("ip", "netdev"))


def _keys(elements: Iterable[Element]) -> set[tuple[str, str, int]]:
    """The frontends the elements give a verdict (a FIREWALL element only guards one)."""
    return {key for verdict, key in elements if verdict is not Verdict.FIREWALL}


def _allow_lines(verb: str, allows: Iterable[Allow]) -> list[str]:
    items = [f"{ip} . {protocol.lower()} . {port} . {cidr}" for (ip, protocol, port), cidr in sorted(allows)]
    return [
        f"{verb} element ip {TABLE} {ALLOW_SET} {{ {', '.join(items[start:start + 1000])} }}"
        for start in range(0, len(items), 1000)
    ]


def _reentry_lines(verb: str, keys: set[tuple[str, str, int]]) -> list[str]:
    items = [f"{ip} . {protocol.lower()} . {port}" for ip, protocol, port in sorted(keys)]
    return [
        f"{verb} element netdev {TABLE} services {{ {', '.join(items[start:start + 1000])} }}"
        for start in range(0, len(items), 1000)
    ]


def _element_lines(verb: str, elements: Iterable[Element]) -> list[str]:
    by_set: dict[str, list[str]] = {}
    for verdict, (ip, protocol, port) in sorted(elements, key=lambda e: (e[0].value, e[1])):
        by_set.setdefault(SETS[verdict], []).append(f"{ip} . {protocol.lower()} . {port}")
    lines = []
    for name, items in by_set.items():
        for start in range(0, len(items), 1000):
            chunk = ", ".join(items[start:start + 1000])
            lines.append(f"{verb} element ip {TABLE} {name} {{ {chunk} }}")
    return lines


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
