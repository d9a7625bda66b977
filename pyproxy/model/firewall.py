"""`spec.loadBalancerSourceRanges`: which sources may reach a Service's load-balancer IPs.

Rules kept here (kube-proxy's nftables firewall, pkg/proxy/nftables):
- Only load-balancer IPs that pyproxy captures (`ipMode` VIP or unset) are guarded;
  ClusterIPs, externalIPs and NodePorts never are, even on the same Service.
- The ranges of the load-balancer IP's own family apply. None of that family, or one
  zero-length range (`0.0.0.0/0`), means no firewall: everyone may connect.
- A source outside the ranges is dropped (the client times out), whatever it is: a host
  outside the cluster, a pod, or the node itself. Pods and the node are not exempt, as
  kube-proxy checks the source before anything else.
- When a range holds the node's primary IP of that family, the Service's load-balancer IPs
  of that family are allowed as sources too: a node that holds a VIP as a local address
  reaches it from the VIP itself.
- The allowed sources are returned merged (no range inside another), so each is one
  interval of the kernel's set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_sources(
    ranges: Iterable[str], lb_ip: str, lb_ips: Iterable[str], node_ips: Iterable[str]
) -> tuple[str, ...] | None:
    """The source CIDRs that may reach `lb_ip`, or None when it has no firewall."""
    version = ipaddress.ip_address(lb_ip).version
    networks: list[Network] = [n for n in map(ipaddress.ip_network, ranges) if n.version == version]
    if not networks or any(n.prefixlen == 0 for n in networks):
        return None
    node = [ipaddress.ip_address(ip) for ip in node_ips if ipaddress.ip_address(ip).version == version]
    if any(ip in n for ip in node for n in networks):
        networks += [ipaddress.ip_network(ip) for ip in lb_ips if ipaddress.ip_address(ip).version == version]
    merged: Iterable[Network] = ipaddress.collapse_addresses(networks)  # type: ignore[type-var]
    return tuple(str(n) for n in merged)
