"""The rendered table against the real `nft`, in a private network namespace.

A full write, then an incremental one, both through NftRunner, read back with
`nft -j list table ip pyproxy`. The namespace is this test's own and is removed afterwards;
the root namespace's firewall is never touched.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyproxy.dataplane.nft import (
    REENTRY_DEVICE,
    NftConfig,
    NftError,
    NftRunner,
    render_bridge_cleanup,
    render_cleanup,
    render_ruleset,
    render_update,
)
from pyproxy.dataplane.replies import REPLY_MAC
from pyproxy.model.table import Element, Verdict
from tests.conftest import private_netns, privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

CONFIG = NftConfig(mark=0x1F, tcp_port=15001, udp_port=15002, local_sources=("10.244.0.0/16",),
                   pod_bridges=("cni0", "cbr0"))
CAP, REJ, DI, DE = Verdict.CAPTURE, Verdict.REJECT, Verdict.DROP_INTERNAL, Verdict.DROP_EXTERNAL


# libnftables applies scripts in the calling process's namespace: a helper process in the
# test's namespace runs them through LibNftRunner, one JSON line per script.
LIBRARY_SERVER = """
import json, sys
from pyproxy.dataplane.libnft import LibNftRunner, load_library
from pyproxy.dataplane.nft import NftError
runner = LibNftRunner(load_library())
for line in sys.stdin:
    try:
        runner.apply_now(json.loads(line))
        print(json.dumps(None), flush=True)
    except NftError as err:
        print(json.dumps(str(err)), flush=True)
runner.close()
"""


class LibraryInNetns(NftRunner):
    """LibNftRunner, run in the namespace by a helper process (see LIBRARY_SERVER)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", LIBRARY_SERVER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())

    async def apply(self, script: str) -> None:
        if not script:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(script) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the library helper exited"
        error = json.loads(answer)
        if error is not None:
            raise NftError(error)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Netns:
    def __init__(self, name: str, workdir: Path, runner: str = "command") -> None:
        self.name = name
        wrapper = workdir / "nft-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {name} nft "$@"\n')
        wrapper.chmod(0o755)
        # NftRunner's own I/O, inside the namespace; or libnftables in a process there
        self.runner = NftRunner(binary=str(wrapper)) if runner == "command" else LibraryInNetns(name)

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, "nft", *args], capture_output=True, text=True,
                              check=check, timeout=10)

    def sets(self, family: str = "ip") -> dict[str, set[tuple[str, str, int]]]:
        """set name -> elements, read back from the kernel."""
        listing: list[dict[str, Any]] = json.loads(self.nft("-j", "list", "table", family, "pyproxy").stdout)["nftables"]
        found: dict[str, set[tuple[str, str, int]]] = {}
        for entry in listing:
            if "set" not in entry:
                continue
            elements = found.setdefault(entry["set"]["name"], set())
            for element in entry["set"].get("elem", ()):
                if isinstance(element, dict) and len(element.get("concat", ())) == 3:  # not svc_allow's
                    ip, proto, port = element["concat"]
                    elements.add((ip, str(proto), int(port)))
        return found


@pytest.fixture(params=["command", "library"])
def netns(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Netns]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-nft-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        # the re-entry veth the pod-bridge chain forwards into (routing.py makes it in pyproxy)
        subprocess.run(["ip", "-n", name, "link", "add", REENTRY_DEVICE, "type", "veth", "peer", "name", "in0"],
                       check=True, timeout=10)
        made = Netns(name, tmp_path, request.param)
        try:
            yield made
        finally:
            if isinstance(made.runner, LibraryInNetns):
                made.runner.close()


def kernel_view(elements: set[Element]) -> dict[str, set[tuple[str, str, int]]]:
    names = {CAP: "svc_capture", REJ: "svc_reject", DI: "svc_drop_internal", DE: "svc_drop_external",
             Verdict.FIREWALL: "svc_firewall"}
    view: dict[str, set[tuple[str, str, int]]] = {name: set() for name in names.values()}
    for verdict, (ip, protocol, port) in elements:
        view[names[verdict]].add((ip, protocol.lower(), port))
    return view


async def test_full_then_incremental_write(netns: Netns) -> None:
    first: set[Element] = {
        (CAP, ("10.96.0.10", "TCP", 80)),
        (CAP, ("10.96.0.53", "UDP", 53)),
        (REJ, ("10.96.0.11", "TCP", 443)),
        (DI, ("10.96.0.12", "TCP", 80)),
        (DE, ("192.168.1.10", "TCP", 30080)),
    }
    await netns.runner.apply(render_ruleset(CONFIG, first))
    sets = netns.sets()
    assert {k: v for k, v in sets.items() if k not in ("local_sources", "svc_allow", "services")} == kernel_view(first)
    # the guard in front of the per-service rules holds every frontend, whatever its verdict
    assert sets["services"] == {key for v in kernel_view(first).values() for key in v}
    tables = netns.nft("list", "tables").stdout.split()
    assert tables == ["table", "ip", "pyproxy", "table", "ip6", "pyproxy", "table", "netdev", "pyproxy",
                      "table", "bridge", "pyproxy"]
    ruleset = netns.nft("list", "table", "ip", "pyproxy").stdout
    assert "tproxy to 127.0.0.1:15001" in ruleset and "socket transparent 1" in ruleset
    # the pod bridges' chain is accepted for bridges that do not exist (yet), and its set
    # holds every frontend whatever its verdict
    reentry = netns.nft("list", "table", "netdev", "pyproxy").stdout
    assert 'devices = { cbr0, cni0 }' in reentry or 'devices = { cni0, cbr0 }' in reentry, reentry
    assert f'fwd to "{REENTRY_DEVICE}"' in reentry
    assert netns.sets("netdev") == {"services": {key for v in kernel_view(first).values() for key in v},
                                    "services6": set()}

    # an incremental sync: 10.96.0.11 gets endpoints, the UDP service goes away
    added: set[Element] = {(CAP, ("10.96.0.11", "TCP", 443))}
    removed: set[Element] = {(REJ, ("10.96.0.11", "TCP", 443)), (CAP, ("10.96.0.53", "UDP", 53))}
    await netns.runner.apply(render_update(added, removed))
    second = (first - removed) | added
    sets = netns.sets()
    assert {k: v for k, v in sets.items() if k not in ("local_sources", "svc_allow", "services")} == kernel_view(second)
    assert sets["services"] == {key for v in kernel_view(second).values() for key in v}
    assert netns.sets("netdev") == {"services": {key for v in kernel_view(second).values() for key in v},
                                    "services6": set()}

    # a full write replaces the table whole: elements not in it are gone
    await netns.runner.apply(render_ruleset(CONFIG, {(CAP, ("10.96.0.10", "TCP", 80))}))
    assert netns.sets()["svc_capture"] == {("10.96.0.10", "tcp", 80)}
    assert netns.sets()["svc_drop_external"] == set()


async def test_ipv6_elements_land_in_the_ip6_table_the_kernel_accepts(netns: Netns) -> None:
    config = NftConfig(mark=0x200000, tcp_port=15001, udp_port=15002,
                       local_sources=("10.244.0.0/16", "fd00:244::/56", "fd00:244:1::/64"), pod_bridges=("cni0",))
    dual: set[Element] = {(CAP, ("10.96.0.10", "TCP", 80)), (CAP, ("fd00:96::10", "TCP", 80)),
                          (REJ, ("fd00:96::11", "UDP", 53)), (DE, ("fd00:56::101", "TCP", 30080))}
    await netns.runner.apply(render_ruleset(config, dual))
    v6 = netns.sets("ip6")
    assert v6["svc_capture"] == {("fd00:96::10", "tcp", 80)}
    assert v6["svc_reject"] == {("fd00:96::11", "udp", 53)}
    assert v6["svc_drop_external"] == {("fd00:56::101", "tcp", 30080)}
    assert netns.sets("ip")["svc_capture"] == {("10.96.0.10", "tcp", 80)}
    ruleset = netns.nft("list", "table", "ip6", "pyproxy").stdout
    assert "tproxy to [::1]:15001" in ruleset and "tproxy to [::1]:15002" in ruleset
    assert v6["services"] == {("fd00:96::10", "tcp", 80), ("fd00:96::11", "udp", 53), ("fd00:56::101", "tcp", 30080)}
    assert "fd00:244::/56" in netns.nft("list", "set", "ip6", "pyproxy", "local_sources").stdout
    assert netns.sets("netdev")["services6"] == {("fd00:96::10", "tcp", 80), ("fd00:96::11", "udp", 53),
                                                 ("fd00:56::101", "tcp", 30080)}
    await netns.runner.apply(render_update({(CAP, ("fd00:96::11", "UDP", 53))}, {(REJ, ("fd00:96::11", "UDP", 53))}))
    assert netns.sets("ip6")["svc_capture"] == {("fd00:96::10", "tcp", 80), ("fd00:96::11", "udp", 53)}


async def test_overlapping_local_sources_are_accepted(netns: Netns) -> None:
    config = NftConfig(mark=1, tcp_port=15001, udp_port=15002, local_sources=("10.244.0.0/16", "10.244.1.0/24"))
    await netns.runner.apply(render_ruleset(config, ()))
    assert "10.244.0.0/16" in netns.nft("list", "set", "ip", "pyproxy", "local_sources").stdout


async def test_large_update_in_chunks(netns: Netns) -> None:
    await netns.runner.apply(render_ruleset(CONFIG, ()))
    many: set[Element] = {(CAP, (f"10.96.{i // 250}.{i % 250 + 1}", "TCP", 80)) for i in range(2500)}
    await netns.runner.apply(render_update(many, ()))
    assert len(netns.sets()["svc_capture"]) == 2500


async def test_failed_incremental_write_raises_and_changes_nothing(netns: Netns) -> None:
    await netns.runner.apply(render_ruleset(CONFIG, {(CAP, ("10.96.0.10", "TCP", 80))}))
    bad = render_update({(CAP, ("10.96.0.20", "TCP", 80))}, {(REJ, ("10.96.0.99", "TCP", 80))})
    with pytest.raises(NftError):
        await netns.runner.apply(bad)  # deleting an element that is not there
    assert netns.sets()["svc_capture"] == {("10.96.0.10", "tcp", 80)}  # one transaction: nothing added


async def test_cleanup_removes_the_table_and_is_idempotent(netns: Netns) -> None:
    await netns.runner.apply(render_ruleset(CONFIG, ()))
    await netns.runner.apply(render_cleanup())
    assert netns.nft("list", "tables").stdout.strip() == "table bridge pyproxy"  # its own transaction
    await netns.runner.apply(render_bridge_cleanup())
    assert netns.nft("list", "tables").stdout.strip() == ""
    await netns.runner.apply(render_cleanup())  # nothing to remove: still fine
    await netns.runner.apply(render_bridge_cleanup())
    assert netns.nft("list", "tables").stdout.strip() == ""


async def test_the_bridge_table_and_its_steering_updates(netns: Netns) -> None:
    """replies.py's table as the kernel takes it: the chain, the subnets, the endpoints and
    their hosts, then an incremental change that keeps a host with one port left."""
    config = replace(CONFIG, bridge_subnets=("10.244.1.0/24", "fd00:244:1::/64"))
    first = frozenset({("10.244.1.5", "TCP", 80), ("10.244.1.5", "UDP", 53), ("fd00:244:1::5", "TCP", 80)})
    await netns.runner.apply(render_ruleset(config, (), steered=first))
    listed = netns.nft("list", "table", "bridge", "pyproxy").stdout
    # -300, which nft names `dstnat` in the bridge family: before br_netfilter's 0
    assert re.search(r"type filter hook prerouting priority (-300|dstnat); policy accept;", listed), listed
    assert f"ether daddr set {REPLY_MAC} meta pkttype set host" in listed
    assert "elements = { 10.244.1.0/24 }" in listed and "elements = { fd00:244:1::/64 }" in listed
    assert netns.sets("bridge")["steer"] == {("10.244.1.5", "tcp", 80), ("10.244.1.5", "udp", 53)}
    assert netns.sets("bridge")["steer6"] == {("fd00:244:1::5", "tcp", 80)}
    second = frozenset({("10.244.1.5", "TCP", 80), ("10.244.1.6", "TCP", 80)})
    await netns.runner.apply(render_update((), (), steered_before=first, steered=second))
    assert netns.sets("bridge")["steer"] == {("10.244.1.5", "tcp", 80), ("10.244.1.6", "tcp", 80)}
    assert netns.sets("bridge")["steer6"] == set()
    hosts = netns.nft("list", "set", "bridge", "pyproxy", "steer_hosts").stdout
    assert "10.244.1.5" in hosts and "10.244.1.6" in hosts
    assert "fd00:244:1::5" not in netns.nft("list", "set", "bridge", "pyproxy", "steer_hosts6").stdout


async def test_source_range_firewall_sets_take_overlapping_ranges_of_many_frontends(netns: Netns) -> None:
    """svc_allow is an interval set of concatenations: the same range for two frontends, and
    ranges of one frontend inside each other's neighbourhood, are all accepted; an update
    removes exactly one pair."""
    lb = ("1.2.3.4", "TCP", 80)
    other = ("5.6.7.8", "UDP", 53)
    allows = {(lb, "192.168.0.0/24"), (lb, "203.0.113.0/25"), (other, "192.168.0.0/24"), (lb, "1.2.3.4/32")}
    elements: set[Element] = {(CAP, lb), (Verdict.FIREWALL, lb), (REJ, other), (Verdict.FIREWALL, other)}
    await netns.runner.apply(render_ruleset(CONFIG, elements, allows))
    listed = netns.nft("list", "set", "ip", "pyproxy", "svc_allow").stdout
    for (ip, proto, port), cidr in allows:
        assert f"{ip} . {proto.lower()} . {port} . {cidr.removesuffix('/32')}" in listed, listed
    await netns.runner.apply(render_update(set(), set(), set(), {(lb, "203.0.113.0/25")}))
    listed = netns.nft("list", "set", "ip", "pyproxy", "svc_allow").stdout
    assert "203.0.113.0/25" not in listed and "1.2.3.4 . tcp . 80 . 192.168.0.0/24" in listed
    lb6 = ("fd00:97::1", "TCP", 80)  # the ip6 table has its own pair of sets
    await netns.runner.apply(render_update({(CAP, lb6), (Verdict.FIREWALL, lb6)}, set(), {(lb6, "fd00:56::/64")}))
    listed6 = netns.nft("list", "set", "ip6", "pyproxy", "svc_allow").stdout
    assert "fd00:97::1 . tcp . 80 . fd00:56::/64" in listed6, listed6
