"""Address families: which family an address is, and how an address is written.

Rules kept here (SPEC.md §11):
- Addresses travel through the model as canonical strings (`ipaddress`'s form: IPv6
  compressed and lower-case), so equal addresses compare equal as text. The family of an
  address is a property of its text: an IPv6 address has a colon, an IPv4 one never does.
- A frontend of one family is served from endpoints of the same family only: an IPv6
  ClusterIP goes to the Service's IPv6 endpoints (an `addressType: IPv6` slice), never to
  its IPv4 ones, as kube-proxy's per-family proxiers do. So "no endpoints" is decided per
  family too.
- An address with a port is written `ip:port` for IPv4 and `[ip]:port` for IPv6,
  everywhere a person reads it (logs, metrics labels, the debug API, `pyproxy inspect`);
  `split_host_port` reads both forms back.
- A socket address from the kernel (a 4-tuple for IPv6: host, port, flowinfo, scope) is
  cut to (host, port) at the edge (`host_port`), so the model never sees flow labels.
- Addresses a node never serves NodePorts on: IPv6 link-local ones (fe80::/10, they need
  a scope and are not reachable from off the link by their address alone) and `::1`
  (kube-proxy does not serve NodePorts on IPv6 loopback: IPv6 has no route_localnet).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any


class Family(enum.Enum):
    IPV4 = "IPv4"  # the names the API uses (ipFamilies, addressType)
    IPV6 = "IPv6"

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is a Python call, paid at every dict lookup keyed by a family, per service port.
    __hash__ = object.__hash__

    @property
    def nft(self) -> str:
        """The nftables table family that holds this family's rules."""
        return "ip" if self is Family.IPV4 else "ip6"


FAMILIES: tuple[Family, ...] = tuple(Family)  # iterating the Enum class itself is slow, and this runs per port


def family_of(ip: str) -> Family:
    """The family of a canonical address (or of any address text: only the colon decides)."""
    return Family.IPV6 if ":" in ip else Family.IPV4


def canonical(ip: str) -> str:
    """The canonical text of an address; ValueError when `ip` is not one."""
    return str(ipaddress.ip_address(ip))


def host_port(address: Sequence[Any]) -> tuple[str, int]:
    """A kernel socket address (AF_INET 2-tuple or AF_INET6 4-tuple) as (host, port)."""
    return str(address[0]), int(address[1])


def join_host_port(ip: str, port: int) -> str:
    """`ip:port`, or `[ip]:port` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """Read `ip:port` or `[ip]:port` back; ValueError for anything else."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected host:port (IPv6 as [address]:port)")
    if not port.isdigit():
        raise ValueError(f"{text!r}: {port!r} is not a port number")
    return host, int(port)


def node_port_candidate(ip: str) -> bool:
    """Whether a node address may carry NodePorts (see the module's rules)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    return not (address.version == 6 and (address.is_link_local or address.is_loopback))


def by_family(addresses: Iterable[str]) -> dict[Family, tuple[str, ...]]:
    """Addresses grouped by family, each group in the order given."""
    groups: dict[Family, list[str]] = {}
    for ip in addresses:
        groups.setdefault(family_of(ip), []).append(ip)
    return {family: tuple(ips) for family, ips in groups.items()}
