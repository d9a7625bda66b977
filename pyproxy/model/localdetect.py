"""Which sources are this node's pods: kube-proxy's `--detect-local-mode`, as one pure function.

pyproxy uses the answer for one thing, the short-circuit of SPEC.md §2 (kube-proxy's
"short-circuit pod traffic"): a pod of this node that connects to an external address of
its Service (NodePort, externalIP, load-balancer IP) with `externalTrafficPolicy: Local`
is served from the cluster set with the node's address, never dropped for lack of a local
endpoint. (kube-proxy also uses it to masquerade off-cluster traffic to ClusterIPs;
pyproxy's upstream connection is its own, so there is nothing to masquerade.)

Rules kept here:
- `ClusterCIDR`: the pods are `clusterCIDR` (`--cluster-cidr`); empty: no pod is detected.
- `NodeCIDR`: the pods are the Node's `spec.podCIDRs`, read from the Node object, so a
  kind or kubeadm cluster needs no per-cluster setting. None yet: no pod is detected.
- `BridgeInterface`: the pods are whatever this node routes through that bridge.
- `InterfaceNamePrefix`: the pods are whatever this node routes through interfaces whose
  names start with the prefix (`veth`, `cali`, ...).
  kube-proxy matches the interface a packet comes in on; pyproxy matches the source
  address against the routes through those interfaces (re-read at every sync), which is
  the same set on a node whose reverse paths are consistent, and works where the
  interface is not visible: for the relay, and for bridged frames that re-enter on
  pyproxy's own veth.
- The node itself (its own addresses) is always local, in every mode.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyproxy.model.objects import Node

CLUSTER_CIDR = "ClusterCIDR"
NODE_CIDR = "NodeCIDR"
BRIDGE_INTERFACE = "BridgeInterface"
INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"
MODES = (CLUSTER_CIDR, NODE_CIDR, BRIDGE_INTERFACE, INTERFACE_NAME_PREFIX)
INTERFACE_MODES = (BRIDGE_INTERFACE, INTERFACE_NAME_PREFIX)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalDetection:
    mode: str = CLUSTER_CIDR
    cluster_cidrs: tuple[str, ...] = ()
    bridge_interface: str = ""
    interface_prefix: str = ""

    @property
    def reads_interfaces(self) -> bool:
        return self.mode in INTERFACE_MODES

    @property
    def reads_node(self) -> bool:
        return self.mode == NODE_CIDR


def pod_networks(
    detection: LocalDetection, node: Node | None, routes: Iterable[tuple[str, str]] = ()
) -> tuple[Network, ...]:
    """The networks whose sources count as this node's pods. `routes` are (interface,
    destination CIDR) of the node's routes; only the interface modes read them."""
    if detection.mode == CLUSTER_CIDR:
        cidrs: Iterable[str] = detection.cluster_cidrs
    elif detection.mode == NODE_CIDR:
        cidrs = node.pod_cidrs if node else ()
    elif detection.mode == BRIDGE_INTERFACE:
        cidrs = [dst for name, dst in routes if name == detection.bridge_interface]
    else:
        cidrs = [dst for name, dst in routes if detection.interface_prefix and name.startswith(detection.interface_prefix)]
    networks = {ipaddress.ip_network(c, strict=False) for c in cidrs}
    return tuple(sorted((n for n in networks if n.prefixlen > 0), key=lambda n: (n.version, n)))
