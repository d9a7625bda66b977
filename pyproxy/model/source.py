"""Whose address an endpoint sees as the client (SPEC.md §5), as pure decisions.

kube-proxy masquerades some traffic and not the rest; pyproxy's upstream connection is its
own, so "not masqueraded" means an upstream socket bound to the client's address
(`IP_TRANSPARENT`), whose replies the kernel hands back to the proxy (nft.py's `socket
transparent` rule). That only works where the replies come back through this node.

Rules kept here:
- Every upstream connection has a `Source` mode, chosen per endpoint when the route is
  planned (`target_source`), and resolved per connection (`keeps_client`):
  - `CLIENT`: always the client's address (`externalTrafficPolicy: Local` from outside:
    table.py's `Plan.transparent`).
  - `POD`: the client's address when the client is a pod of this node, and not the endpoint
    itself; otherwise the node's. Every other plan is `POD`: a pod reaching any Service
    address keeps its IP, as kube-proxy leaves in-cluster pod traffic alone.
  - `NODE`: always the node's address.
- "A pod of this node" is an address inside this Node's `spec.podCIDRs`, and not one of
  the node's own addresses: the pod network routes those ranges to this node, so replies
  come back here. Not the detect-local networks: with `ClusterCIDR` those hold every node's
  pods, whose replies go back through their own node, never to this proxy. Not a pod
  bridge's subnet alone either: a bridge's subnet outside the podCIDRs may be routed
  nowhere but here. No Node read yet: no pod is known, and every client gets the node's
  address (what the proxy did before it knew better).
- The node itself, and a pod reaching itself through its Service (hairpin: the endpoint's
  address is the client's), get the node's address, as kube-proxy masquerades both.
- The node itself as an endpoint gets `NODE` (a hostNetwork endpoint here, such as the API
  server behind `kubernetes` on a control-plane node): its replies to a pod leave by the
  output path, never through this node's prerouting (where the `socket transparent` rule
  finds the proxy's socket), and the pod would reset a reply from an address it never
  called.
- An endpoint on this node's pod bridge would answer a pod of the same bridge frame to
  frame, past the node, for the same reset. Where the replies are steered up to the node
  (`steered`: the subnets of the pod bridges the `bridge pyproxy` table serves,
  dataplane/replies.py) such an endpoint gets `POD` like any other; on a bridge it cannot
  serve (one that filters VLANs), `NODE`.
- The endpoints whose replies are steered (`bridged_endpoints`) are every address and port
  of every EndpointSlice endpoint inside a pod bridge's subnet, whatever its conditions:
  an unready or terminating pod still answers the connections it has.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Set
from dataclasses import dataclass

from pyproxy.model.localdetect import Network
from pyproxy.model.objects import EndpointSlice

Steer = tuple[str, str, int]  # an endpoint on a pod bridge: (ip, protocol, port)
PROTOCOLS = ("TCP", "UDP")  # what the proxy relays


class Source(enum.IntEnum):
    NODE = 0  # the node's address
    CLIENT = 1  # the client's address
    POD = 2  # the client's address if it is a pod of this node and not the endpoint itself


@dataclass(frozen=True)
class SourcePolicy:
    """What this node knows of its own pods, as of the last sync."""

    node_addresses: frozenset[str] = frozenset()
    pods: tuple[Network, ...] = ()  # this Node's spec.podCIDRs
    bridged: tuple[Network, ...] = ()  # the pod bridges' subnets
    steered: tuple[Network, ...] = ()  # bridges whose endpoints' replies go up to the node (dataplane/replies.py)

    def is_pod(self, ip: str) -> bool:
        """A pod of this node: inside `pods`, and not the node's own address."""
        return ip not in self.node_addresses and _inside(ip, self.pods)

    def target_source(self, transparent: bool, endpoint_ip: str) -> Source:
        """The mode of an upstream connection to `endpoint_ip` under a plan."""
        if transparent:
            return Source.CLIENT
        if not self.pods or endpoint_ip in self.node_addresses:
            return Source.NODE
        if _inside(endpoint_ip, self.bridged) and not _inside(endpoint_ip, self.steered):
            return Source.NODE
        return Source.POD

    def keeps_client(self, mode: Source, client_ip: str, endpoint_ip: str) -> bool:
        """Whether this connection's upstream socket is bound to the client's address."""
        if mode == Source.CLIENT:
            return True
        return mode == Source.POD and client_ip != endpoint_ip and self.is_pod(client_ip)

    def prefixes(self) -> tuple[tuple[int, bytes, int], ...]:
        """`pods` for the compiled engine: (family 4 or 6, network address bytes, prefix length)."""
        return tuple((n.version, n.network_address.packed, n.prefixlen) for n in self.pods)


def source_policy(node_addresses: Iterable[str], pod_cidrs: Iterable[str],
                  bridged: Iterable[Network], steered: Iterable[Network] = ()) -> SourcePolicy:
    """The policy for a node with these addresses, Node podCIDRs and pod bridge subnets."""
    networks = {ipaddress.ip_network(c, strict=False) for c in pod_cidrs}
    pods = tuple(sorted((n for n in networks if n.prefixlen > 0), key=lambda n: (n.version, n)))
    return SourcePolicy(frozenset(node_addresses), pods, tuple(bridged), tuple(steered))


def bridged_endpoints(slices: Iterable[EndpointSlice], bridged: Iterable[Network],
                      node_addresses: Set[str] = frozenset()) -> frozenset[Steer]:
    """(ip, protocol, port) of every endpoint of `slices`, whatever its conditions, whose
    address is inside a pod bridge's subnet (`bridged`) and not the node's own."""
    networks = tuple(bridged)
    if not networks:
        return frozenset()
    found: set[Steer] = set()
    for endpoint_slice in slices:
        ports = [(p.protocol, p.port) for p in endpoint_slice.ports if p.protocol in PROTOCOLS and p.port]
        if not ports:
            continue
        for endpoint in endpoint_slice.endpoints:
            if endpoint.ip not in node_addresses and _inside(endpoint.ip, networks):
                found.update((endpoint.ip, protocol, port) for protocol, port in ports)
    return frozenset(found)


def _inside(ip: str, networks: Iterable[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks if net.version == address.version)
