"""pyproxy's nftables table: rendering it (pure) and applying it (`nft -f -`, the only I/O).

Rules kept here (DATAPLANE.md):
- pyproxy owns exactly one table, `ip pyproxy`, and touches nothing else.
- The rules never change while running; services come and go as set elements:
  `capture` (TPROXY to the proxy), `reject` (no endpoints: TCP reset / ICMP unreachable),
  `drop_internal` and `drop_external` (Local policy without a local endpoint; external
  drops spare the node itself and `local_sources`, i.e. the cluster CIDR, whose traffic
  is captured and served from the cluster set: kube-proxy's short-circuit).
- Order in prerouting: refusals and drops, then capture, then `socket transparent` (the
  reply path of Local mode; before the capture rules it would steal new UDP queries).
- An output `route` chain marks the node's own traffic to service addresses so that the
  policy route sends it through `lo` and back into prerouting.
- A full write replaces the table atomically; an incremental write only adds and deletes
  elements. A failed incremental write is answered by a full write.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyproxy.model.table import Element, Verdict

TABLE = "pyproxy"
SET_TYPE = "ipv4_addr . inet_proto . inet_service"
MATCH = "ip daddr . meta l4proto . th dport"
SETS = {verdict: f"svc_{verdict.value}" for verdict in Verdict}


@dataclass(frozen=True)
class NftConfig:
    mark: int
    tcp_port: int
    udp_port: int
    local_sources: tuple[str, ...] = ()  # CIDRs whose traffic counts as "from this cluster"


def render_ruleset(config: NftConfig, elements: Iterable[Element]) -> str:
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
        "    set local_sources { type ipv4_addr; flags interval; "
        + (f"elements = {{ {local_sources} }}; " if local_sources else "")
        + "}",
        "    chain prerouting {",
        "        type filter hook prerouting priority mangle; policy accept;",
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
        f"        {MATCH} @svc_drop_internal drop",
        # the node's own UDP to a service without endpoints: an ICMP error cannot come back
        # through lo, so refuse it here (send() fails at once) rather than let it time out
        f"        {MATCH} @svc_reject meta l4proto udp reject",
        f"        {MATCH} @svc_capture {set_mark}",
        f"        {MATCH} @svc_drop_external {set_mark}",
        f"        {MATCH} @svc_reject {set_mark}",
        "    }",
        "}",
    ]
    lines += _element_lines("add", elements)
    return "\n".join(lines) + "\n"


def render_update(added: Iterable[Element], removed: Iterable[Element]) -> str:
    """An incremental transaction: only set elements change."""
    lines = _element_lines("delete", removed) + _element_lines("add", added)
    return "\n".join(lines) + "\n" if lines else ""


def render_cleanup() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


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
