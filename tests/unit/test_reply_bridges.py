"""routing.py's choice of the bridges the `bridge pyproxy` table serves: not one that
filters VLANs (its fdb lookups are per VLAN; this host's kernel cannot make one, so the
netlink message is built here, encoded and decoded as the kernel's would be)."""

from __future__ import annotations

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pyproxy.dataplane.routing import _filters_vlans


def link(info: list[tuple[str, object]] | None) -> ifinfmsg:
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", "cni0")] + ([("IFLA_LINKINFO", {"attrs": info})] if info is not None else [])
    msg.encode()
    decoded = ifinfmsg(msg.data)
    decoded.decode()
    return decoded


def bridge(vlan_filtering: int) -> ifinfmsg:
    return link([("IFLA_INFO_KIND", "bridge"),
                 ("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_VLAN_FILTERING", vlan_filtering)]})])


def test_a_bridge_that_filters_vlans_is_left_out() -> None:
    assert _filters_vlans(bridge(1))


def test_a_plain_bridge_and_a_link_without_bridge_data_are_served() -> None:
    assert not _filters_vlans(bridge(0))
    assert not _filters_vlans(link(None))
