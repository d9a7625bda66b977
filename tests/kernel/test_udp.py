"""UDP services on the real kernel: cluster DNS (dnsmasq, dig) and the echo pods through pyproxy.

Shape: the module's `cluster` (pods pa on node1, pb and pc on node2, echo servers on UDP 53
and 5353) plus two DNS pods, dns1 on node1 and dns2 on node2, running dnsmasq, and a client
pod `ucl` on node1. node1's proxy is restarted with a small flow table (maxUDPFlows 50,
udpIdleTimeout 2s) so the bound and the expiry can be watched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyproxy.demo import dns
from pyproxy.demo import manifests as m
from pyproxy.demo.lab import CLIENT_IP, LAN_PREFIX, node_ip
from tests.conftest import skip_or_fail
from tests.kernel.conftest import Cluster

LOCAL_PHASE_IP = f"{LAN_PREFIX}.150"  # a second client address: no flows from before a policy change

pytestmark = pytest.mark.privileged

MAX_FLOWS = 50
IDLE_TIMEOUT = 2.0
CONFIG = f"""\
apiVersion: pyproxy.io/v1alpha1
kind: PyProxyConfiguration
dataplane:
  maxUDPFlows: {MAX_FLOWS}
  udpIdleTimeout: {IDLE_TIMEOUT:g}s
"""
DNS_IP = "10.96.0.53"
ECHO_IP = "10.96.0.54"
EMPTY_IP = "10.96.0.55"
RECORDS = {"web": "10.1.2.3", "db": "10.1.2.4"}
ECHO = ("pa", "pb", "pc")

# A connected UDP socket per probe: prints the outcome and the milliseconds it took.
PROBE = """
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((host, port))
        started = time.monotonic()
        try:
            s.send(b"x")
            outcome = s.recv(70000)[:20].decode(errors="replace").split()[0]
        except ConnectionRefusedError:
            outcome = "refused"
        except PermissionError:  # the node's own datagram, refused by the output chain
            outcome = "rejected"
        except (socket.timeout, TimeoutError):
            outcome = "timeout"
        print(outcome, round((time.monotonic() - started) * 1000, 2), flush=True)
"""

# Many client ports at once: every socket stays open, each sends one datagram and waits for
# its answer before the next is opened. Prints how many were answered.
FLOOD = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, answered = [], 0
try:
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(s)
        s.settimeout(1)
        s.connect((host, port))
        s.send(b"flood %d" % i)
        try:
            answered += s.recv(2048).endswith(b"flood %d" % i)
        except OSError:
            pass
finally:
    for s in socks:
        s.close()
print(answered)
"""


def python(cluster: Cluster, ns: str, script: str, *args: str, timeout: float = 60) -> list[str]:
    result = cluster.lab.exec(ns, sys.executable, "-c", script, *args, timeout=timeout)
    return result.stdout.split("\n")[:-1]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pods_of(lines: list[str]) -> list[str]:
    return [re.search(r"pod=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def clients_of(lines: list[str]) -> list[str]:
    return [re.search(r"client=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def udp(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with DNS pods, a client pod, and node1's proxy on a small flow table."""
    for tool, package in (("dnsmasq", "dnsmasq-base"), ("dig", "dnsutils")):
        if shutil.which(tool) is None:
            skip_or_fail(f"needs '{tool}' (apt-get install {package})")
    lab = cluster.lab
    for pod, node in (("dns1", "node1"), ("dns2", "node2"), ("ucl", "node1")):
        lab.add_pod(pod, node)
    for pod in ("dns1", "dns2"):
        dns.start_dns(lab, pod, RECORDS, log=cluster.workdir / f"{pod}.log")
    config = cluster.workdir / "udp-config.yaml"
    config.write_text(CONFIG)
    old_args = [str(a) for a in cluster.proxies["node1"].args]  # type: ignore[union-attr]
    loop_args = old_args[old_args.index("--healthz-bind-address") + 2:]  # e.g. the event loop under test
    lab.stop(cluster.proxies["node1"])
    before = cluster.syncs("node1")
    cluster.start_proxy("node1", *loop_args, "--config", str(config))
    cluster.wait_for_log("node1", " synced ", before)
    yield cluster


def dns_log(cluster: Cluster, pod: str) -> str:
    return Path(cluster.workdir / f"{pod}.log").read_text()


def kube_dns(cluster: Cluster, external_policy: str | None = None, dns_pods: tuple[str, ...] = ("dns1", "dns2")) -> None:
    """A kube-dns look-alike: port 53 on UDP and TCP (the same number), a NodePort each."""
    cluster.apply(
        m.service("kube-dns", DNS_IP, [m.port(53, 53, name="dns", protocol="UDP", node_port=30053),
                                       m.port(53, 53, name="dns-tcp", protocol="TCP", node_port=30053)],
                  type="NodePort", external_policy=external_policy, namespace="kube-system"),
        m.endpoint_slice("kube-dns", cluster.backends(*dns_pods),
                         [m.slice_port(53, name="dns", protocol="UDP"),
                          m.slice_port(53, name="dns-tcp", protocol="TCP")], namespace="kube-system"),
        name="kube-dns.yaml",
    )


def echo_service(cluster: Cluster, external_policy: str | None = None) -> None:
    """UDP and TCP on the same service port 80: UDP goes to the pods' UDP 5353, TCP to their TCP 80."""
    cluster.apply(
        m.service("uecho", ECHO_IP, [m.port(80, 5353, name="u", protocol="UDP", node_port=30054),
                                     m.port(80, 80, name="t", protocol="TCP", node_port=30054)],
                  type="NodePort", external_policy=external_policy),
        m.endpoint_slice("uecho", cluster.backends(*ECHO),
                         [m.slice_port(5353, name="u", protocol="UDP"), m.slice_port(80, name="t", protocol="TCP")]),
        name="uecho.yaml",
    )


def test_cluster_dns_through_the_cluster_ip_from_pods_and_nodes(udp: Cluster) -> None:
    kube_dns(udp)
    # the very first datagram to the new Service answers (it once went out of the default
    # route: the test sent it before node1's proxy had even read the new manifest, having
    # counted the sync a fresh process makes a second after its first; Cluster.apply now
    # waits for a sync after the reload)
    assert dns.lookup(udp.lab, "node1", f"{DNS_IP}:53", "web", timeout=1) == ["10.1.2.3"]
    for where in ("ucl", "node1", "node2", "pb", "client"):
        for name, address in RECORDS.items():
            assert dns.lookup(udp.lab, where, f"{DNS_IP}:53", name) == [address], f"{where}: {name}"
        assert dns.lookup(udp.lab, where, f"{DNS_IP}:53", "web", tcp=True) == ["10.1.2.3"], f"{where}: TCP"
    # a resolver's every query is a new client port, so a new flow: both DNS pods answer
    answered_by = {dns.lookup(udp.lab, "ucl", f"{DNS_IP}:53", "whoami", "TXT")[0] for _ in range(20)}
    assert answered_by == {"dns1", "dns2"}


def test_kdig_and_the_nodeport_answer_too(udp: Cluster) -> None:
    if shutil.which("kdig") is None:
        skip_or_fail("needs 'kdig' (apt-get install knot-dnsutils)")
    kube_dns(udp)
    result = udp.lab.exec("ucl", "kdig", "+short", "+timeout=2", "+retry=0", f"@{DNS_IP}", "db.svc.test", check=False)
    assert result.stdout.split() == ["10.1.2.4"], result.stdout + result.stderr
    for node in (1, 2):
        assert dns.lookup(udp.lab, "client", f"{node_ip(node)}:30053", "web") == ["10.1.2.3"]


def local_phase_client(cluster: Cluster) -> str:
    """A second client address, with no flows yet. A policy change leaves live flows on their
    endpoints (as kube-proxy's conntrack cleanup does), and flows live for udpIdleTimeout: a
    new socket that the kernel gives the port of a flow from before the change back to would
    be that flow. So the flows checked after a change come from here."""
    cluster.lab.exec("client", "ip", "addr", "replace", f"{LOCAL_PHASE_IP}/24", "dev", "eth0")
    return LOCAL_PHASE_IP


def test_local_policy_dns_sees_the_clients_own_address(udp: Cluster) -> None:
    kube_dns(udp, external_policy="Local")
    source = local_phase_client(udp)
    seen_before = len(dns.queries_seen(dns_log(udp, "dns1")))
    for _ in range(5):
        assert dns.lookup(udp.lab, "client", f"{node_ip(1)}:30053", "whoami", "TXT", source=source) == ["dns1"], \
            "node1's own pod"
    queries = dns.queries_seen(dns_log(udp, "dns1"))[seen_before:]
    assert [client for name, client in queries if name == "whoami.svc.test"] == [source] * 5
    assert dns.lookup(udp.lab, "client", f"{node_ip(2)}:30053", "whoami", "TXT", source=source) == ["dns2"]


def test_cluster_and_local_policy_with_the_echo_pods(udp: Cluster) -> None:
    echo_service(udp)
    # enough flows that a uniform pick missing a pod is out of the question (3 x (2/3)^40)
    lines = udp.run("client", "udp", f"{node_ip(1)}:30054", "--count", "40")
    assert set(pods_of(lines)) == set(ECHO), "Cluster policy spreads new flows over every pod"
    assert CLIENT_IP not in clients_of(lines) and all("whole=True" in line for line in lines)
    echo_service(udp, external_policy="Local")
    source = local_phase_client(udp)  # not CLIENT_IP: its 40 flows above are live
    lines = udp.run("client", "udp", f"{node_ip(1)}:30054", "--count", "5", "--bind", source)
    assert set(pods_of(lines)) == {"pa"} and set(clients_of(lines)) == {source}, lines
    lines = udp.run("client", "udp", f"{node_ip(2)}:30054", "--count", "30", "--bind", source)  # one pod: 2^-29
    assert set(pods_of(lines)) == {"pb", "pc"} and set(clients_of(lines)) == {source}, lines


def test_large_datagrams_pass_whole(udp: Cluster) -> None:
    echo_service(udp)
    for where in ("client", "ucl", "node1"):
        for size in (1, 1472, 9000, 60000, 65000):
            lines = udp.run(where, "udp", f"{ECHO_IP}:80", "--size", str(size), "--count", "3")
            assert all(f"len={size} whole=True" in line for line in lines), f"{where} {size}: {lines}"


def test_tcp_and_udp_on_the_same_service_port(udp: Cluster) -> None:
    echo_service(udp)
    tcp = udp.run("client", "who", f"{ECHO_IP}:80", "--count", "6")
    datagrams = udp.run("client", "udp", f"{ECHO_IP}:80", "--count", "6")
    assert all("port=80" in line for line in tcp), tcp
    assert all("port=5353" in line for line in datagrams), datagrams
    assert set(pods_of(tcp + datagrams)) <= set(ECHO)
    nft = udp.lab.exec("node1", "nft", "list", "set", "ip", "pyproxy", "svc_capture").stdout
    assert f"{ECHO_IP} . tcp . 80" in nft and f"{ECHO_IP} . udp . 80" in nft, nft


def test_no_endpoints_is_refused_fast(udp: Cluster) -> None:
    """ICMP port unreachable from nftables: ECONNREFUSED on a connected socket, at once.

    The kernel rate-limits ICMP errors per destination (net.ipv4.icmp_ratelimit: a burst of
    about 6, then one a second), so each client here sends only a handful of probes.
    """
    udp.apply(
        m.service("uempty", EMPTY_IP, [m.port(53, 53, protocol="UDP", node_port=30055)], type="NodePort"),
        m.endpoint_slice("uempty", [], [m.slice_port(53, protocol="UDP")]),
        name="uempty.yaml",
    )
    time.sleep(1.5)  # a fresh ICMP budget for the client
    assert dns.lookup(udp.lab, "client", f"{EMPTY_IP}:53", "web") == ["refused"]
    for where, host, port in (("client", EMPTY_IP, 53), ("client", node_ip(1), 30055), ("ucl", EMPTY_IP, 53)):
        for line in python(udp, where, PROBE, host, str(port), "2"):
            outcome, ms = line.split()
            assert outcome == "refused", f"{where} -> {host}:{port}: {line}"
            assert float(ms) < 100, f"{where} -> {host}:{port}: refusal took {ms} ms"
    for line in python(udp, "node1", PROBE, EMPTY_IP, "53", "2"):  # the node itself
        outcome, ms = line.split()
        assert outcome in ("refused", "rejected") and float(ms) < 100, f"node1 -> {EMPTY_IP}:53: {line}"


def test_flows_are_bounded_and_expire_without_leaking_sockets(udp: Cluster) -> None:
    echo_service(udp)
    pid = udp.serving_pid("node1")
    time.sleep(IDLE_TIMEOUT + 1)  # earlier tests' flows are gone
    baseline = fds(pid)
    answered = python(udp, "client", FLOOD, ECHO_IP, "80", str(MAX_FLOWS * 4))
    during = fds(pid)
    assert answered == [str(MAX_FLOWS * 4)], "every query is answered: eviction only costs quiet flows"
    assert baseline + MAX_FLOWS * 0.8 <= during <= baseline + MAX_FLOWS + 2, (baseline, during)
    assert "UDP flow table full" in udp.log("node1")
    deadline = time.monotonic() + IDLE_TIMEOUT * 4
    while fds(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fds(pid) <= baseline, f"sockets left after the idle timeout: {fds(pid)} > {baseline}"


def test_flows_to_a_removed_endpoint_are_dropped(udp: Cluster) -> None:
    """A flow pinned to a pod that leaves gets no more answers from it; a new flow goes elsewhere."""
    echo_service(udp)
    pid = udp.serving_pid("node1")
    time.sleep(IDLE_TIMEOUT + 1)
    baseline = fds(pid)
    # one long-lived client port, talking every 0.3 s (well inside the idle timeout)
    script = """
import socket, sys, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(1)
    s.connect((sys.argv[1], int(sys.argv[2])))
    for _ in range(int(sys.argv[3])):
        s.send(b"x")
        try:
            print(s.recv(2048).split()[0].decode(), flush=True)
        except OSError as err:
            print(type(err).__name__, flush=True)
        time.sleep(0.3)
"""
    lab = udp.lab
    with subprocess.Popen(["ip", "netns", "exec", lab.ns("client"), sys.executable, "-c", script,
                           ECHO_IP, "80", "20"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("pod="), first
        pinned = first.removeprefix("pod=")
        rest = [p for p in ECHO if p != pinned]
        udp.apply(
            m.service("uecho", ECHO_IP, [m.port(80, 5353, name="u", protocol="UDP", node_port=30054),
                                         m.port(80, 80, name="t", protocol="TCP", node_port=30054)],
                      type="NodePort"),
            m.endpoint_slice("uecho", udp.backends(*rest),
                             [m.slice_port(5353, name="u", protocol="UDP"), m.slice_port(80, name="t", protocol="TCP")]),
            name="uecho.yaml",
        )
        proc_lines = [line.strip() for line in proc.stdout]
        proc.wait(30)
    later = proc_lines[-5:]
    assert all(line in {f"pod={p}" for p in rest} for line in later), proc_lines
    assert "endpoint" in udp.log("node1") and "is gone" in udp.log("node1")
    deadline = time.monotonic() + IDLE_TIMEOUT * 4
    while fds(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fds(pid) <= baseline


def test_the_demo_helpers_show_a_lookup_through_pyproxy(udp: Cluster) -> None:
    dns.setup_cluster_dns(udp)  # the pods exist already: only the Service is (re)written
    lines = dns.show_lookups(udp, "ucl")
    assert lines[:3] == [f"dig @{DNS_IP} db.svc.test -> 10.1.2.4", f"dig @{DNS_IP} web.svc.test -> 10.1.2.3",
                         f"dig +tcp @{DNS_IP} web.svc.test -> 10.1.2.3"], lines
    assert set(lines[3].split(": ")[1].split()) <= {"dns1", "dns2"}, lines
