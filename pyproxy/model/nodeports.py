"""The node addresses that serve NodePorts: kube-proxy's `--nodeport-addresses`, pure.

Rules kept here (kube-proxy's NodePortAddresses and its keyword expansion):
- The list holds CIDRs and the keywords `primary` (the Node object's primary IPs, one per
  family: `Node.host_ips`) and `all` (every address). Keywords expand first.
- Per family: the CIDRs of that family select the local addresses inside them; a family
  with no CIDR at all in the list (or a zero-length one) serves every local address of
  that family. So an empty list serves every local address, and `primary` on a node whose
  Node object has no address yet (or that has none) also serves every local address, as
  kube-proxy's expansion of `primary` to nothing does.
- Unlike kube-proxy, which expands `primary` once at start (and exits when the Node's IPs
  change), pyproxy expands it at every sync: a changed address moves the NodePorts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

PRIMARY = "primary"
ALL = "all"
KEYWORDS = (PRIMARY, ALL)


def expand(entries: Iterable[str], host_ips: Iterable[str]) -> tuple[str, ...]:
    """The CIDRs a list of CIDRs and keywords stands for."""
    cidrs: list[str] = []
    for entry in entries:
        if entry == PRIMARY:
            cidrs += [str(ipaddress.ip_network(ip)) for ip in host_ips if not ipaddress.ip_address(ip).is_loopback]
        elif entry == ALL:
            cidrs += ["0.0.0.0/0", "::/0"]
        else:
            cidrs.append(entry)
    return tuple(cidrs)


def select(addresses: Iterable[str], entries: Iterable[str], host_ips: Iterable[str] = ()) -> list[str]:
    """The local `addresses` that serve NodePorts under the `--nodeport-addresses` `entries`."""
    networks = [ipaddress.ip_network(c, strict=False) for c in expand(entries, host_ips)]
    chosen = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        family = [n for n in networks if n.version == ip.version]
        if not family or any(ip in n for n in family):
            chosen.append(address)
    return sorted(chosen)
