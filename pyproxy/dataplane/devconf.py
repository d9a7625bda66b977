"""Per-interface IPv4 settings (the kernel's devconf) set over rtnetlink.

Rules it keeps:
- Only for pyproxy's own interfaces (today: `src_valid_mark` on the re-entry peer).
- In a container /proc/sys is mounted read-only even with CAP_NET_ADMIN, so writing
  /proc/sys/net/ipv4/conf/IF/... fails there; RTM_SETLINK with
  IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF / {setting: value} does the same with CAP_NET_ADMIN.
  (pyroute2 encodes that attribute only as the dump's fixed array, which the kernel does not
  accept on a set, hence these few bytes of our own.)
- A refusal from the kernel is an OSError with its errno; nothing else is changed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping

RTM_SETLINK = 19
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_F_NESTED = 0x8000
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
IPV4_DEVCONF_SRC_VMARK = 24  # include/uapi/linux/ip.h


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def setlink_message(ifindex: int, settings: Mapping[int, int], seq: int = 1) -> bytes:
    """The RTM_SETLINK request that sets IPv4 devconf `settings` ({id: value}) on `ifindex`."""
    conf = b"".join(_attr(key, struct.pack("=I", value)) for key, value in sorted(settings.items()))
    nested = _attr(IFLA_INET_CONF | NLA_F_NESTED, conf)
    nested = _attr(socket.AF_INET | NLA_F_NESTED, nested)
    body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, ifindex, 0, 0) + _attr(IFLA_AF_SPEC | NLA_F_NESTED, nested)
    return struct.pack("=IHHII", 16 + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def ack_error(reply: bytes) -> int:
    """The errno of a netlink ACK (0 for success); ValueError if it is not one."""
    _, kind = struct.unpack_from("=IH", reply)
    if kind != NLMSG_ERROR:
        raise ValueError(f"not a netlink ack (message type {kind})")
    (error,) = struct.unpack_from("=i", reply, 16)
    return -int(error)


def set_ipv4_devconf(interface: str, settings: Mapping[int, int]) -> None:
    """Set IPv4 devconf values on `interface` (in this network namespace)."""
    ifindex = socket.if_nametoindex(interface)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.sendall(setlink_message(ifindex, settings))
        code = ack_error(sock.recv(65536))
    if code:
        raise OSError(code, f"setting IPv4 devconf on {interface}: {os.strerror(code)}")
