"""The benchmark's network: client, node and backend namespaces joined by routed veths.

    client ns              node ns                       backend ns i (1..n)
    eth0 10.200.0.2/24 --- c0 10.200.0.1/24
    + 10.200.1.k/32 (source addresses)
                           b<i> 10.201.i.1/24 ----------- eth0 10.201.i.2/24 (default via node)

Rules kept here:
- Every namespace name starts with the run's unique prefix (`pb<pid>-`), so parallel runs
  and other tests never collide; veths are created directly inside their namespaces, so no
  interface ever appears in the root namespace, whose firewall and routes are never touched.
- No link leads out of these namespaces: traffic cannot reach anything else.
- The client routes the service range (10.96.0.0/16) and the backend range via the node; the
  node forwards (ip_forward=1, for `direct` and `dnat`), backends route replies via the node.
- `commands` is pure (the plan); `create` runs it and records each namespace it made in
  `made`; `destroy` deletes exactly those, so a half-built topology is cleaned up and a
  namespace that existed before (a clash) is never touched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

SERVICE_CIDR = "10.96.0.0/16"
BACKEND_CIDR = "10.201.0.0/16"
CLIENT_ADDR = "10.200.0.2"
NODE_ADDR = "10.200.0.1"
MAX_SOURCES = 250
MAX_BACKENDS = 50


@dataclass(frozen=True)
class Topology:
    prefix: str  # e.g. "pb1234-"
    backends: int = 2
    sources: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.backends <= MAX_BACKENDS or not 1 <= self.sources <= MAX_SOURCES:
            raise ValueError("backends must be in [1, 50] and sources in [1, 250]")

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}cl"

    @property
    def node_ns(self) -> str:
        return f"{self.prefix}nd"

    def backend_ns(self, i: int) -> str:
        return f"{self.prefix}b{i}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client_ns, self.node_ns, *(self.backend_ns(i) for i in self.backend_ids))

    @property
    def backend_ids(self) -> range:
        return range(1, self.backends + 1)

    @staticmethod
    def backend_addr(i: int) -> str:
        return f"10.201.{i}.2"

    @property
    def source_addrs(self) -> tuple[str, ...]:
        return tuple(f"10.200.1.{k}" for k in range(1, self.sources + 1))

    @property
    def source_cidr(self) -> str:
        """The prefix routed back to the client (holds every source address)."""
        return "10.200.1.0/24"

    @property
    def source_list(self) -> str:
        """The source addresses for `--source-addrs` (exactly the assigned ones)."""
        return ",".join(self.source_addrs)


def _ip(ns: str, *args: str) -> list[str]:
    return ["ip", "-n", ns, *args]


def _sysctl(ns: str, *settings: str) -> list[str]:
    return ["ip", "netns", "exec", ns, "sysctl", "-qw", *settings]


def commands(t: Topology) -> list[list[str]]:
    """The commands that build the topology, in order."""
    cl, nd = t.client_ns, t.node_ns
    cmds = [["ip", "netns", "add", ns] for ns in t.namespaces]
    cmds.append(["ip", "link", "add", "eth0", "netns", cl, "type", "veth", "peer", "name", "c0", "netns", nd])
    for i in t.backend_ids:
        cmds.append(["ip", "link", "add", "eth0", "netns", t.backend_ns(i), "type", "veth",
                     "peer", "name", f"b{i}", "netns", nd])
    for ns in t.namespaces:
        cmds.append(_ip(ns, "link", "set", "lo", "up"))
    cmds += [
        _ip(cl, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0"),
        _ip(cl, "link", "set", "eth0", "up"),
        _ip(cl, "route", "add", SERVICE_CIDR, "via", NODE_ADDR),
        _ip(cl, "route", "add", BACKEND_CIDR, "via", NODE_ADDR),
        _ip(nd, "addr", "add", f"{NODE_ADDR}/24", "dev", "c0"),
        _ip(nd, "link", "set", "c0", "up"),
        _ip(nd, "route", "add", t.source_cidr, "via", CLIENT_ADDR),
    ]
    for i in t.backend_ids:
        b = t.backend_ns(i)
        cmds += [
            _ip(nd, "addr", "add", f"10.201.{i}.1/24", "dev", f"b{i}"),
            _ip(nd, "link", "set", f"b{i}", "up"),
            _ip(b, "addr", "add", f"{t.backend_addr(i)}/24", "dev", "eth0"),
            _ip(b, "link", "set", "eth0", "up"),
            _ip(b, "route", "add", "default", "via", f"10.201.{i}.1"),
        ]
    ports = "net.ipv4.ip_local_port_range=1024 65000"
    cmds += [
        _sysctl(nd, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0", ports),
        _sysctl(cl, ports, "net.ipv4.tcp_tw_reuse=1"),
    ]
    return cmds


def source_batch(t: Topology) -> str:
    """`ip -batch` input adding the client's source addresses."""
    return "".join(f"addr add {a}/32 dev eth0\n" for a in t.source_addrs)


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def create(t: Topology, made: list[str]) -> None:
    existing = list_namespaces()
    clash = [ns for ns in t.namespaces if ns in existing]
    if clash:
        raise RuntimeError(f"namespaces already exist: {clash}")
    for cmd in commands(t):
        _run(cmd)
        if cmd[:3] == ["ip", "netns", "add"]:
            made.append(cmd[3])
    _run(["ip", "-n", t.client_ns, "-batch", "-"], stdin=source_batch(t))


def list_namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def destroy(made: list[str]) -> list[str]:
    """Delete the namespaces `create` made; returns the errors (if any)."""
    errors = []
    existing = list_namespaces()
    for ns in made:
        if ns in existing:
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                errors.append(f"{ns}: {done.stderr.strip()}")
    return errors


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]
