"""Cluster DNS for the demo and the tests: a real DNS server (dnsmasq) in a pod namespace.

Rules kept here:
- dnsmasq runs in the foreground in the pod's namespace, answers only from the records
  given (no upstream servers, no /etc/hosts, no config files), on UDP and TCP port `port`,
  and logs every query with its source address (`query[A] name from IP`), so callers can
  tell which pod answered and which client address it saw.
- Every pod's server also answers `whoami.<domain>` TXT with the pod's name.
- It is started through the Lab (so the Lab ends it, by PID, and removes the namespace),
  and `start_dns` returns only once the server answers, within a bounded wait.
- Lookups use `dig` (dnsutils) with one try and a short timeout: a failure is a line of
  text (`timeout`, `refused`, ...), never a hang.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyproxy.demo import manifests as m
from pyproxy.demo.cluster import Cluster
from pyproxy.demo.lab import Lab, LabError

DOMAIN = "svc.test"
CLUSTER_DNS_IP = "10.96.0.53"
RECORDS = {"web": "10.1.2.3", "db": "10.1.2.4"}
_QUERY = re.compile(r"query\[\w+\] (\S+) from (\d+\.\d+\.\d+\.\d+)")


def dnsmasq_args(pod: str, listen_ip: str, records: Mapping[str, str], port: int = 53,
                 domain: str = DOMAIN) -> list[str]:
    """dnsmasq's command line: `records` maps names (under `domain`) to IPv4 addresses."""
    args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--pid-file", "--user=root", "--log-queries", "--log-facility=-", "--bind-interfaces",
            f"--listen-address={listen_ip}", f"--port={port}", f"--txt-record=whoami.{domain},{pod}"]
    for name, ip in sorted(records.items()):
        args.append(f"--host-record={_qualified(name, domain)},{ip}")
    return args


def start_dns(lab: Lab, pod: str, records: Mapping[str, str], port: int = 53, log: Path | None = None,
              timeout: float = 10.0) -> subprocess.Popen[Any]:
    """Start dnsmasq in `pod` (a Lab pod) and wait until it answers on the pod's own address."""
    ip = lab.pods[pod].ip
    proc = lab.spawn(pod, dnsmasq_args(pod, ip, records, port), log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"dnsmasq in {pod} exited with {proc.returncode}")
        if lookup(lab, pod, f"{ip}:{port}", f"whoami.{DOMAIN}", "TXT", timeout=1) == [pod]:
            return proc
        time.sleep(0.1)
    raise LabError(f"dnsmasq in {pod} did not answer within {timeout}s")


def lookup(lab: Lab, where: str, server: str, name: str, rtype: str = "A", tcp: bool = False,
           timeout: float = 2.0, source: str | None = None) -> list[str]:
    """`dig +short` from namespace `where` against `server` (ip:port), from the address
    `source` if given: the answers, or one error word."""
    host, _, port = server.rpartition(":")
    args = ["dig", "+short", f"+time={max(1, round(timeout))}", "+tries=1", "-p", port, f"@{host}",
            _qualified(name, DOMAIN), rtype]
    if tcp:
        args.insert(1, "+tcp")
    if source:
        args[1:1] = ["-b", source]
    result = lab.exec(where, *args, check=False, timeout=timeout + 5)
    text = result.stdout.strip()
    if result.returncode != 0 or text.startswith(";;"):
        return ["refused" if "refused" in text else "timeout" if "timed out" in text else f"error {text[:80]}"]
    return [line.strip('"') for line in text.splitlines()]


def queries_seen(log_text: str) -> list[tuple[str, str]]:
    """(name, client IP) for every query a dnsmasq log shows."""
    return _QUERY.findall(log_text)


def setup_cluster_dns(cluster: Cluster, pods: Mapping[str, str] | None = None,
                      cluster_ip: str = CLUSTER_DNS_IP, records: Mapping[str, str] = RECORDS) -> None:
    """The demo's kube-dns: dnsmasq pods (name -> node; default dns1 on node1, dns2 on node2)
    behind a Service `kube-system/kube-dns` with port 53 on UDP and TCP; returns once synced."""
    pods = pods or {"dns1": "node1", "dns2": "node2"}
    for pod, node in pods.items():
        if pod not in cluster.lab.pods:
            cluster.lab.add_pod(pod, node)
            start_dns(cluster.lab, pod, records, log=cluster.workdir / f"{pod}.log")
    cluster.apply(
        m.service("kube-dns", cluster_ip, [m.port(53, 53, name="dns", protocol="UDP"),
                                           m.port(53, 53, name="dns-tcp", protocol="TCP")],
                  namespace="kube-system"),
        m.endpoint_slice("kube-dns", cluster.backends(*pods),
                         [m.slice_port(53, name="dns", protocol="UDP"), m.slice_port(53, name="dns-tcp", protocol="TCP")],
                         namespace="kube-system"),
        name="kube-dns.yaml",
    )


def show_lookups(cluster: Cluster, where: str, cluster_ip: str = CLUSTER_DNS_IP, count: int = 4) -> list[str]:
    """Demo lines: `dig` through the ClusterIP from namespace `where`, and which DNS pod answered."""
    lines = []
    for name in sorted(RECORDS):
        answer = " ".join(lookup(cluster.lab, where, f"{cluster_ip}:53", name))
        lines.append(f"dig @{cluster_ip} {name}.{DOMAIN} -> {answer}")
    lines.append(f"dig +tcp @{cluster_ip} web.{DOMAIN} -> {' '.join(lookup(cluster.lab, where, f'{cluster_ip}:53', 'web', tcp=True))}")
    answered_by = [lookup(cluster.lab, where, f"{cluster_ip}:53", "whoami", "TXT")[0] for _ in range(count)]
    lines.append(f"{count} queries (new client port each) answered by: {' '.join(answered_by)}")
    return lines


def _qualified(name: str, domain: str) -> str:
    return name if name.endswith(domain) else f"{name}.{domain}"
