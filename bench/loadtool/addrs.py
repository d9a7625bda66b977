"""Client source addresses: parse a list or a CIDR, and share them among load processes.

Rules kept here:
- `--source-addrs` is a comma-separated list of IPv4 addresses and/or CIDRs; a CIDR means its
  host addresses (network and broadcast excluded for prefixes shorter than /31).
- The result keeps the order given and drops duplicates; it is bounded (MAX_SOURCES).
- Process i of n gets addresses i, i+n, i+2n, ... so every process has a fair share; with
  fewer addresses than processes, every process gets all of them (round robin is per
  connection anyway).
- Pure: no sockets here.
"""

from __future__ import annotations

import ipaddress

MAX_SOURCES = 65536


def parse_source_addrs(text: str) -> tuple[str, ...]:
    """'10.0.0.1,10.0.1.0/30' -> ('10.0.0.1', '10.0.1.1', '10.0.1.2'). Empty text -> ()."""
    out: dict[str, None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "/" in part:
            net = ipaddress.IPv4Network(part, strict=False)
            hosts = net.hosts() if net.prefixlen < 31 else iter(net)
            for host in hosts:
                out[str(host)] = None
                if len(out) > MAX_SOURCES:
                    raise ValueError(f"more than {MAX_SOURCES} source addresses")
        else:
            out[str(ipaddress.IPv4Address(part))] = None
    if len(out) > MAX_SOURCES:
        raise ValueError(f"more than {MAX_SOURCES} source addresses")
    return tuple(out)


def share(addrs: tuple[str, ...], index: int, count: int) -> tuple[str, ...]:
    """The addresses process `index` of `count` uses."""
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"bad process index {index} of {count}")
    if len(addrs) < count:
        return addrs
    return addrs[index::count]


def split_evenly(total: int, index: int, count: int) -> int:
    """Process `index`'s part of `total` (connections, rate units): parts differ by at most 1."""
    base, extra = divmod(total, count)
    return base + (1 if index < extra else 0)
