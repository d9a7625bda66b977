"""Policy routing for TPROXY, and the node's addresses, through netlink (pyroute2).

Rules kept here:
- Marked packets (`fwmark MARK/MARK`) look up a table of pyproxy's own whose only route
  is `local 0.0.0.0/0 dev lo`: they are delivered to this host, where TPROXY's socket
  assignment hands them to the proxy. IPv6 has the same rule and a `local ::/0 dev lo`
  route in its own routing table of the same number. A node without IPv6 (the module
  not loaded, or `disable_ipv6` on lo) gets the IPv4 half and one log line; it serves IPv4.
- For pods on a Linux bridge, a veth pair of pyproxy's own (`pyproxy-fwd` <-> `pyproxy-in`,
  the peer with a fixed MAC): the `netdev pyproxy` table forwards their frames to service
  addresses into it, so they re-enter the IPv4 stack without br_netfilter's state and
  TPROXY holds for them (nft.py explains why). The peer holds one link-local /32, so that
  loose reverse-path filtering (`rp_filter=2`) accepts what enters there; that address is
  not a node address (no NodePorts on it).
- Strict reverse-path filtering (`rp_filter=1`) checks that the route back to the source
  leaves by the interface the packet came in on, but the pods' route points at the bridge.
  So re-entering frames carry `reentry_mark`; the peer has `src_valid_mark=1` (the check's
  lookup sees the mark; a per-interface setting of pyproxy's own interface, set over netlink), and a rule
  `fwmark reentry_mark lookup table+1`, one priority before the TPROXY rule, finds there a
  route per pod bridge subnet `dev pyproxy-in` (`route_pod_bridges`, at every change of the
  bridges). Only the check's lookup ever matches those routes: forward lookups of marked
  packets are for service addresses, which the table does not hold, so they fall through.
- Each pod bridge holds a `local` fdb entry of pyproxy's own, `replies.REPLY_MAC`
  (`reply_bridges`, at every sync: a bridge made again gets it back): frames the `bridge
  pyproxy` table sends to that MAC are delivered to the node, not forwarded to a port.
  Not on a bridge that filters VLANs: its lookups are per VLAN, so an entry of none is
  never found; `reply_bridges` leaves such a bridge out, and its endpoints fall back to
  the node's address (model/source.py). `release_reply_mac` (at `--cleanup`) takes the
  entries away.
- Installing is idempotent; `remove` takes away exactly what `install` added.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyproxy.dataplane.devconf import IPV4_DEVCONF_SRC_VMARK, set_ipv4_devconf
from pyproxy.dataplane.nft import REENTRY_ADDRESS, REENTRY_DEVICE, REENTRY_MAC, REENTRY_PEER
from pyproxy.dataplane.replies import REPLY_MAC
from pyproxy.model.family import node_port_candidate

log = logging.getLogger("pyproxy.routing")
SCOPE_HOST = 254  # a local route must say so, as `ip route add local` does
ANY = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
IFA_F_DADFAILED = 0x08


@dataclass(frozen=True)
class PolicyRouting:
    mark: int
    table: int
    priority: int
    reentry_mark: int = 0  # 0: no reverse-path routes for re-entering frames

    @property
    def reentry_table(self) -> int:
        return self.table + 1

    def _reentry_rule(self, ipr: IPRoute, verb: str) -> None:
        ipr.rule(verb, family=socket.AF_INET, fwmark=self.reentry_mark, fwmask=self.reentry_mark,
                 table=self.reentry_table, priority=self.priority - 1)

    def route_pod_bridges(self, subnets: Iterable[str]) -> None:
        """Make the re-entry table hold exactly the IPv4 `subnets`, each `dev pyproxy-in`."""
        if not self.reentry_mark:
            return
        with IPRoute() as ipr:
            peer = ipr.link_lookup(ifname=REENTRY_PEER)
            if not peer:
                return
            want = {s for s in subnets if ":" not in s}  # IPv6 has no reverse-path filter to satisfy
            for msg in ipr.get_routes(family=socket.AF_INET, table=self.reentry_table):
                dst = f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"
                if dst not in want:
                    _ignore(errno.ESRCH, lambda: ipr.route("del", dst=dst, table=self.reentry_table))
            for dst in sorted(want):
                ipr.route("replace", dst=dst, oif=peer[0], table=self.reentry_table)

    def _tproxy_route(self, ipr: IPRoute, verb: str, family: socket.AddressFamily) -> None:
        """The fwmark rule and the local route of one family (ignoring what is already so)."""
        lo = ipr.link_lookup(ifname="lo")[0]
        done = errno.EEXIST if verb == "add" else errno.ENOENT
        _ignore(done, lambda: ipr.rule(
            verb, family=family, fwmark=self.mark, fwmask=self.mark, table=self.table, priority=self.priority,
        ))
        _ignore(done if verb == "add" else errno.ESRCH, lambda: ipr.route(
            verb, family=family, dst=ANY[family], type="local", scope=SCOPE_HOST, oif=lo, table=self.table,
        ))

    def install(self) -> None:
        with IPRoute() as ipr:
            self._tproxy_route(ipr, "add", socket.AF_INET)
            try:
                self._tproxy_route(ipr, "add", socket.AF_INET6)
            except NetlinkError as err:  # no IPv6 on this node: serve IPv4
                log.warning("no IPv6 policy routing (%s): IPv6 Service addresses will not be served", err)
            _install_reentry(ipr)
            if self.reentry_mark:
                _ignore(errno.EEXIST, lambda: self._reentry_rule(ipr, "add"))
                _set_src_valid_mark(REENTRY_PEER)

    def remove(self) -> None:
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    self._tproxy_route(ipr, "del", family)
                except NetlinkError as err:
                    if family == socket.AF_INET:
                        raise
                    log.debug("no IPv6 policy routing to remove: %s", err)
            if self.reentry_mark:
                _ignore(errno.ENOENT, lambda: self._reentry_rule(ipr, "del"))
                _ignore(errno.ESRCH, lambda: ipr.flush_routes(table=self.reentry_table))
            for index in ipr.link_lookup(ifname=REENTRY_DEVICE):  # its peer goes with it
                _ignore(errno.ENODEV, lambda: ipr.link("del", index=index))


def warm_up() -> None:
    """Open and close one netlink socket: pyroute2 imports most of its modules then, which a
    warm standby (pyproxy/lifecycle/master.py) does before it is needed, not after a crash."""
    try:
        with IPRoute() as ipr:
            ipr.get_links(1)
    except (OSError, NetlinkError) as err:
        log.debug("netlink warm-up: %s", err)


NUD_PERMANENT = 0x80  # `bridge fdb ... local`
NTF_SELF = 0x02  # the entry is the bridge's own, not a port's


def reply_bridges(bridges: Iterable[str], hold: bool = True) -> list[str]:
    """The `bridges` that exist and filter no VLANs: those the `bridge pyproxy` table can
    send replies up from. With `hold` (the process that programs the kernel), each of them
    has REPLY_MAC as a local fdb entry."""
    found = []
    with IPRoute() as ipr:
        for name in sorted(set(bridges)):
            indexes = ipr.link_lookup(ifname=name)
            for link in ipr.get_links(*indexes) if indexes else ():
                if _filters_vlans(link):
                    continue
                found.append(name)
                if hold:
                    index = link["index"]
                    _ignore(errno.EEXIST, lambda: ipr.fdb("add", ifindex=index, lladdr=REPLY_MAC,
                                                          state=NUD_PERMANENT, flags=NTF_SELF))
    return found


def _filters_vlans(link: Any) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return bool(data is not None and data.get_attr("IFLA_BR_VLAN_FILTERING"))


def release_reply_mac(bridges: Iterable[str]) -> None:
    with IPRoute() as ipr:
        for name in sorted(set(bridges)):
            for index in ipr.link_lookup(ifname=name):
                _ignore(errno.ENOENT, lambda: ipr.fdb("del", ifindex=index, lladdr=REPLY_MAC, state=NUD_PERMANENT,
                                                      flags=NTF_SELF))


REENTRY_MTU = 65535  # the veth's maximum: an IP datagram's largest size fits


def _install_reentry(ipr: IPRoute) -> None:
    if not ipr.link_lookup(ifname=REENTRY_DEVICE):
        ipr.link("add", ifname=REENTRY_DEVICE, kind="veth", peer={"ifname": REENTRY_PEER})
    peer = ipr.link_lookup(ifname=REENTRY_PEER)[0]
    ipr.link("set", index=peer, address=REENTRY_MAC)
    _ignore(errno.EEXIST, lambda: ipr.addr("add", index=peer, address=REENTRY_ADDRESS, prefixlen=32))
    for index in (peer, ipr.link_lookup(ifname=REENTRY_DEVICE)[0]):
        # a bridged pod's datagram larger than the MTU arrives as fragments, reassembled by
        # the bridge's netfilter pass before the re-entry chain forwards it here: the pair
        # must carry a whole datagram (a veth drops what exceeds its MTU), so the largest
        ipr.link("set", index=index, mtu=REENTRY_MTU)
        ipr.link("set", index=index, state="up")


def _set_src_valid_mark(interface: str) -> None:
    """The reverse-path check on `interface` (pyproxy's own) looks up routes with the mark.
    Over netlink: in a container /proc/sys is read-only (devconf.py)."""
    set_ipv4_devconf(interface, {IPV4_DEVCONF_SRC_VMARK: 1})


def _ignore(code: int, call: Callable[[], object]) -> None:
    try:
        call()
    except NetlinkError as err:
        if err.code not in (code, errno.ENOENT, errno.ESRCH, errno.EEXIST, errno.ENODEV):
            raise


def local_addresses() -> list[str]:
    """Every address of both families on this host (its network namespace), but pyproxy's
    own re-entry one and IPv6 addresses whose duplicate address detection failed."""
    with IPRoute() as ipr:
        messages = list(ipr.get_addr(family=socket.AF_INET)) + list(ipr.get_addr(family=socket.AF_INET6))
    addresses = set()
    for msg in messages:
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if not flags & IFA_F_DADFAILED:
            addresses.add(str(ipaddress.ip_address(str(msg.get_attr("IFA_ADDRESS")))))
    return sorted(addresses - {REENTRY_ADDRESS})


def pod_bridges(names: Iterable[str]) -> list[tuple[str, str]]:
    """(interface, subnet) for every IPv4 address, and every IPv6 one but link-local, on the
    named interfaces that exist."""
    wanted = set(names)
    if not wanted:
        return []
    found: set[tuple[str, str]] = set()
    with IPRoute() as ipr:
        names_of = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_addr(family=family):
                name = names_of.get(msg["index"], "")
                if name in wanted:
                    network = ipaddress.ip_network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False)
                    if not network.is_link_local:
                        found.add((name, str(network)))
    return sorted(found)


MAIN_TABLE = 254


def interface_routes() -> list[tuple[str, str]]:
    """(interface, destination CIDR) of every route of the main table of both families but
    default and link-local ones: what --detect-local-mode BridgeInterface and
    InterfaceNamePrefix match pods by."""
    with IPRoute() as ipr:
        names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        routes = [*ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE),
                  *ipr.get_routes(family=socket.AF_INET6, table=MAIN_TABLE)]
    found = set()
    for msg in routes:
        oif, dst = msg.get_attr("RTA_OIF"), msg.get_attr("RTA_DST")
        if oif in names and dst and msg["dst_len"] > 0:
            network = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
            if not (network.is_link_local or network.is_multicast):
                found.add((names[oif], str(network)))
    return sorted(found)


def node_port_addresses(addresses: Iterable[str], cidrs: Iterable[str]) -> list[str]:
    """The addresses NodePorts are served on: those inside `cidrs` (of either family), or
    all when none are given; never IPv6 link-local or loopback (family.py)."""
    candidates = [a for a in addresses if node_port_candidate(a)]
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    if not networks:
        return sorted(candidates)
    return sorted(a for a in candidates if any(ipaddress.ip_address(a) in n for n in networks))
