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

from pyproxy.demo.lab import Lab, LabError

DOMAIN = "svc.test"
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
           timeout: float = 2.0) -> list[str]:
    """`dig +short` from namespace `where` against `server` (ip:port): the answers, or one error word."""
    host, _, port = server.rpartition(":")
    args = ["dig", "+short", f"+time={max(1, round(timeout))}", "+tries=1", "-p", port, f"@{host}",
            _qualified(name, DOMAIN), rtype]
    if tcp:
        args.insert(1, "+tcp")
    result = lab.exec(where, *args, check=False, timeout=timeout + 5)
    text = result.stdout.strip()
    if result.returncode != 0 or text.startswith(";;"):
        return ["refused" if "refused" in text else "timeout" if "timed out" in text else f"error {text[:80]}"]
    return [line.strip('"') for line in text.splitlines()]


def queries_seen(log_text: str) -> list[tuple[str, str]]:
    """(name, client IP) for every query a dnsmasq log shows."""
    return _QUERY.findall(log_text)


def _qualified(name: str, domain: str) -> str:
    return name if name.endswith(domain) else f"{name}.{domain}"
