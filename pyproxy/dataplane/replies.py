"""The `bridge pyproxy` table: replies of endpoints on a pod bridge go up to the node (pure text).

A pod keeps its own address towards a Service (model/source.py) through an upstream socket
bound to that address. An endpoint pod on the client pod's own bridge would answer that
address frame to frame over the bridge, past the node's IP layer, and the client pod would
reset a reply it never asked for. This table sends such replies up to the node instead,
where the `socket transparent` rule (nft.py) hands them to the proxy's socket.

Rules kept here:
- One chain, on the bridge family's prerouting hook (every bridge of the node's network
  namespace), at priority -300: before br_netfilter's pass (priority 0), so a changed frame
  meets the IP hooks as a frame to the node would. It matches a unicast frame that the
  bridge would forward to another port (`meta pkttype other`), from an endpoint on a pod
  bridge, `(ip . protocol . port)` in `steer` / `steer6`, to an address inside a pod bridge's
  subnet (`bridged` / `bridged6`), and rewrites its destination MAC to `REPLY_MAC`, an fdb
  entry of pyproxy's own on each pod bridge (`local`: the bridge delivers it to itself;
  routing.py adds it), and its packet type to host, so the node's IP layer takes it.
  Not the bridge's own MAC: the kernel changes that as ports come and go.
- Fragments (a UDP reply larger than the MTU) carry ports in their first piece only, so
  every fragment from an endpoint's address (`steer_hosts` / `steer_hosts6`) to a bridged
  address goes up alike, the first one included; the node reassembles them (TPROXY's
  rules turn defragmentation on) before the socket lookup.
- What else matches (a pod talking to the endpoint's address and port directly, past the
  Service; any fragmented datagram from an endpoint's address to a bridged one) is routed by the node back onto the bridge: it arrives, one hop later (TTL - 1),
  and the node may send the endpoint an ICMP redirect, which it ignores (its route to the
  pod has no gateway). docs/behaviour.md says what that means for firewalls.
- The sets change only by elements, at sync (the endpoints of the EndpointSlices, whatever
  their conditions, so a terminating or unready pod's open connections keep their replies),
  never per connection. `steer_hosts` holds exactly the addresses of `steer`'s elements.
- Rendered only on a node with pod bridges (a routed node needs no bridge family).
"""

from __future__ import annotations

from collections.abc import Iterable

from pyproxy.model.family import Family, family_of
from pyproxy.model.source import Steer

TABLE = "pyproxy"
REPLY_MAC = "02:70:79:70:78:02"  # the local fdb entry on each pod bridge (locally administered)
PRIORITY = -300  # before br_netfilter (0)

_SETS = {  # family: (endpoint set, host set, bridged subnets set, address type, header, fragment test)
    Family.IPV4: ("steer", "steer_hosts", "bridged", "ipv4_addr", "ip", "ip frag-off & 0x3fff != 0"),
    Family.IPV6: ("steer6", "steer_hosts6", "bridged6", "ipv6_addr", "ip6", "exthdr frag exists"),
}
_UP = f"ether daddr set {REPLY_MAC} meta pkttype set host"


def render_table(subnets: Iterable[str], steered: Iterable[Steer]) -> list[str]:
    """The whole table (replacing the previous one), with the bridges' `subnets` and every
    element of `steered`."""
    lines = [f"table bridge {TABLE}", f"delete table bridge {TABLE}", f"table bridge {TABLE} {{"]
    by_family: dict[Family, list[str]] = {}
    for cidr in subnets:
        by_family.setdefault(family_of(cidr.split("/")[0]), []).append(cidr)
    for family, (steer, hosts, bridged, address, _, _) in _SETS.items():
        subnet_text = ", ".join(sorted(by_family.get(family, [])))
        lines += [
            f"    set {steer} {{ type {address} . inet_proto . inet_service; }}",
            f"    set {hosts} {{ type {address}; }}",
            f"    set {bridged} {{ type {address}; flags interval; "
            + (f"elements = {{ {subnet_text} }}; " if subnet_text else "") + "}",
        ]
    lines += ["    chain prerouting {", f"        type filter hook prerouting priority {PRIORITY}; policy accept;"]
    for steer, hosts, bridged, _, header, fragment in _SETS.values():
        lines += [
            f"        meta pkttype other {header} saddr . meta l4proto . th sport @{steer} {header} daddr @{bridged} {_UP}",
            f"        meta pkttype other {fragment} {header} saddr @{hosts} {header} daddr @{bridged} {_UP}",
        ]
    return lines + ["    }", "}", *update_lines(frozenset(), frozenset(steered))]


def update_lines(before: frozenset[Steer], after: frozenset[Steer]) -> list[str]:
    """The element changes that turn the kernel's sets from `before` into `after`."""
    hosts_before, hosts_after = _hosts(before), _hosts(after)
    return (_lines("delete", before - after, hosts_before - hosts_after)
            + _lines("add", after - before, hosts_after - hosts_before))


def _hosts(steered: frozenset[Steer]) -> set[str]:
    return {ip for ip, _, _ in steered}


def _lines(verb: str, keys: Iterable[Steer], hosts: Iterable[str]) -> list[str]:
    by_set: dict[str, list[str]] = {}
    for ip, protocol, port in sorted(keys):
        by_set.setdefault(_SETS[family_of(ip)][0], []).append(f"{ip} . {protocol.lower()} . {port}")
    for ip in sorted(hosts):
        by_set.setdefault(_SETS[family_of(ip)][1], []).append(ip)
    return [f"{verb} element bridge {TABLE} {name} {{ {', '.join(items[start:start + 1000])} }}"
            for name, items in sorted(by_set.items()) for start in range(0, len(items), 1000)]
