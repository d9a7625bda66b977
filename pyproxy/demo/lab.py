"""A throwaway cluster made of network namespaces, for the demo and the real-kernel tests.

Shape (SCENARIOS.md S5's addresses):

    client 192.168.56.100 ─┐
    node1  192.168.56.101 ─┼─ lan (a bridge in a namespace of its own)
    node2  192.168.56.102 ─┘
    node1: pods 10.244.1.0/24 on routed veths (kindnet-style, no bridge)
    node2: pods 10.244.2.0/24 likewise

Dual-stack: every namespace has an IPv6 address beside its IPv4 one, from the ULA range
(LAN fd00:56::/64 with the same host numbers, `client` fd00:56::100; pods fd00:244:N::/64,
services fd00:96::/112). IPv6 addresses are added `nodad` (duplicate address detection
would leave them unusable, "tentative", for a second or two after they are made).

A node added with `bridge=True` hangs its pods off a Linux bridge instead (`cni0`, holding
the pods' gateway 10.244.N.1/24; the shape of the `bridge` CNI plugin, flannel, kubenet),
with `net.bridge.bridge-nf-call-iptables=1` set in the node, as kubeadm requires.

Rules kept here:
- Every namespace carries a unique prefix, is recorded the moment it is made, and is
  deleted by `close()` (also on failure, and from `with` blocks); processes started here
  are ended by their PID and nothing else.
- Traffic only ever flows between namespaces made here; the root namespace's firewall and
  routes are never touched.
- Every wait is bounded.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAN_PREFIX = "192.168.56"
CLIENT_IP = f"{LAN_PREFIX}.100"
LAN6_PREFIX = "fd00:56::"
CLIENT_IP6 = f"{LAN6_PREFIX}100"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:96::/112"
BRIDGE = "cni0"  # the pods' bridge on a bridged node


def node_ip(index: int) -> str:
    return f"{LAN_PREFIX}.{100 + index}"


def node_ip6(index: int) -> str:
    return f"{LAN6_PREFIX}{100 + index}"


def pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"


def pod_cidr6(index: int) -> str:
    return f"fd00:244:{index}::/64"


class LabError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    netns: str
    ip6: str = ""


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: f"pp{os.getpid() % 100000}{int(time.time() * 1000) % 1000:03d}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    bridged: set[str] = field(default_factory=set)  # nodes whose pods hang off BRIDGE
    _pod_count: dict[str, int] = field(default_factory=dict)
    _veths: int = 0

    # namespaces and links

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add_ns(self, name: str) -> str:
        full = self.ns(name)
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        self.exec(name, "ip", "link", "set", "lo", "up")
        return full

    def exec(self, name: str, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(name), *args, check=check, timeout=timeout)

    def sysctl(self, name: str, key: str, value: str) -> None:
        self.exec(name, "sysctl", "-q", "-w", f"{key}={value}")

    def add_ip6(self, name: str, cidr: str, dev: str = "eth0") -> None:
        """An IPv6 address usable at once (no duplicate address detection)."""
        self.exec(name, "ip", "-6", "addr", "add", cidr, "dev", dev, "nodad")

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        self._veths += 1
        tmp_a, tmp_b = f"{self.prefix}a{self._veths}", f"{self.prefix}b{self._veths}"
        sh("ip", "link", "add", tmp_a[:15], "netns", self.ns(a), "type", "veth",
           "peer", "name", tmp_b[:15], "netns", self.ns(b))
        self.exec(a, "ip", "link", "set", tmp_a[:15], "name", a_if)
        self.exec(b, "ip", "link", "set", tmp_b[:15], "name", b_if)
        self.exec(a, "ip", "link", "set", a_if, "up")
        self.exec(b, "ip", "link", "set", b_if, "up")

    # cluster shape

    def build_lan(self) -> None:
        self.add_ns("lan")
        self.exec("lan", "ip", "link", "add", "br0", "type", "bridge")
        self.exec("lan", "ip", "link", "set", "br0", "up")
        self.add_ns("client")
        self.join_lan("client", CLIENT_IP)

    def join_lan(self, name: str, ip: str, ip6: str | None = None) -> None:
        """Put namespace `name` on the LAN with address `ip` (and `ip6`, default: the
        same host number in the IPv6 LAN)."""
        port = f"p{len(self.namespaces)}"
        self.veth(name, "eth0", "lan", port)
        self.exec("lan", "ip", "link", "set", port, "master", "br0")
        self.exec(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.add_ip6(name, f"{ip6 or LAN6_PREFIX + ip.rsplit('.', 1)[1]}/64")

    def add_node(self, name: str, index: int, bridge: bool = False) -> None:
        """A node on the LAN with a pod CIDR; routes to every other node's pods. With `bridge`,
        its pods hang off the bridge `cni0` (gateway 10.244.N.1/24) and the bridge's frames go
        through iptables/nftables' IPv4 hooks (br_netfilter), set here explicitly."""
        self.add_ns(name)
        self.nodes[name] = index
        self.join_lan(name, node_ip(index))
        self.sysctl(name, "net.ipv4.ip_forward", "1")
        self.sysctl(name, "net.ipv6.conf.all.forwarding", "1")
        if bridge:
            self.bridged.add(name)
            self.exec(name, "ip", "link", "add", BRIDGE, "type", "bridge")
            self.exec(name, "ip", "addr", "add", f"10.244.{index}.1/24", "dev", BRIDGE)
            self.add_ip6(name, f"fd00:244:{index}::1/64", dev=BRIDGE)
            self.exec(name, "ip", "link", "set", BRIDGE, "up")
            self.sysctl(name, "net.bridge.bridge-nf-call-iptables", "1")
        # like a real node, a default route (the LAN is closed: nothing leaves the lab); without
        # any route, the node's own connections to service addresses fail with ENETUNREACH
        self.exec(name, "ip", "route", "add", "default", "dev", "eth0")
        self.exec(name, "ip", "-6", "route", "add", "default", "dev", "eth0")
        for other, other_index in self.nodes.items():
            if other != name:
                self.exec(name, "ip", "route", "add", pod_cidr(other_index), "via", node_ip(other_index))
                self.exec(other, "ip", "route", "add", pod_cidr(index), "via", node_ip(index))
                self.exec(name, "ip", "-6", "route", "add", pod_cidr6(other_index), "via", node_ip6(other_index))
                self.exec(other, "ip", "-6", "route", "add", pod_cidr6(index), "via", node_ip6(index))
        self.exec("client", "ip", "route", "replace", pod_cidr(index), "via", node_ip(index))
        self.exec("client", "ip", "-6", "route", "replace", pod_cidr6(index), "via", node_ip6(index))

    def add_pod(self, name: str, node: str) -> Pod:
        """A pod namespace on a routed veth (a /32 route on the node, default via the node), or,
        on a bridged node, on a veth enslaved to the node's bridge (the pod's /24 is on-link)."""
        index = self.nodes[node]
        count = self._pod_count.get(node, 1) + 1
        self._pod_count[node] = count
        ip = f"10.244.{index}.{count}"
        gateway = f"10.244.{index}.1"
        ip6, gateway6 = f"fd00:244:{index}::{count}", f"fd00:244:{index}::1"
        self.add_ns(name)
        host_if = f"v{name}"[:15]
        self.veth(name, "eth0", node, host_if)
        if node in self.bridged:
            self.exec(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.add_ip6(name, f"{ip6}/64")
            self.exec(node, "ip", "link", "set", host_if, "master", BRIDGE)
        else:
            self.exec(name, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
            self.exec(name, "ip", "route", "add", gateway, "dev", "eth0")
            self.exec(node, "ip", "addr", "add", f"{gateway}/32", "dev", host_if)
            self.exec(node, "ip", "route", "add", f"{ip}/32", "dev", host_if)
            self.add_ip6(name, f"{ip6}/128")
            self.exec(name, "ip", "-6", "route", "add", gateway6, "dev", "eth0")
            self.add_ip6(node, f"{gateway6}/128", dev=host_if)
            self.exec(node, "ip", "-6", "route", "add", f"{ip6}/128", "dev", host_if)
        self.exec(name, "ip", "route", "add", "default", "via", gateway)
        self.exec(name, "ip", "-6", "route", "add", "default", "via", gateway6)
        pod = Pod(name, node, ip, self.ns(name), ip6)
        self.pods[name] = pod
        return pod

    def route_client(self, cidr: str, node: str) -> None:
        if ":" in cidr:
            self.exec("client", "ip", "-6", "route", "replace", cidr, "via", node_ip6(self.nodes[node]))
        else:
            self.exec("client", "ip", "route", "replace", cidr, "via", node_ip(self.nodes[node]))

    # processes

    def spawn(self, name: str, args: Sequence[str], log: Path | None = None) -> subprocess.Popen[Any]:
        """Start a process in namespace `name`; its output goes to `log` (else nowhere)."""
        with open(log, "a") if log else open(os.devnull, "w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *args],
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        self.processes.append(proc)
        return proc

    def start_echo(self, pod: str, tcp: Sequence[int] = (80,), udp: Sequence[int] = (),
                   log: Path | None = None) -> subprocess.Popen[Any]:
        """An echo pod; returns once it listens (it prints 'ready'), or raises within `timeout`."""
        args = [sys.executable, "-m", "pyproxy.demo.echo", "--name", pod]
        args += [a for p in tcp for a in ("--tcp", str(p))] + [a for p in udp for a in ("--udp", str(p))]
        with open(log, "a") if log else open(os.devnull, "w") as err:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(pod), *args],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        self.processes.append(proc)
        assert proc.stdout is not None
        with proc.stdout:
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            raise LabError(f"echo server in {pod} did not start (exit code {proc.poll()})")
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10) -> int | None:
        """End a process started here, by its PID: SIGTERM, then SIGKILL after `timeout`."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.processes):
            try:
                self.stop(proc, timeout=5)
            except Exception:  # keep tearing down
                pass
        self.processes.clear()
        for full in reversed(self.namespaces):
            sh("ip", "netns", "del", full, check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(directory: Path, name: str, text: str) -> None:
    """Replace a manifest file atomically, so the proxy never reads half of it."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / name)
