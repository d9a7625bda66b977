"""`pyproxy demo`: SCENARIOS.md played on a throwaway cluster of network namespaces.

It builds a client (192.168.56.100), two nodes running pyproxy standalone (192.168.56.101
and .102) and three echo pods (pa on node1; pb, pc on node2) on routed veths, then shows,
the way the write-ups do, which pod answered and which client address it saw:

- S1: ClusterIP with ClientIP affinity (a short timeout, so the demo need not wait 10 s);
- S2: affinity switched off and on by editing the manifest, live;
- S3: a hundred requests, one pod; then spread with affinity None;
- S5: NodePort with externalTrafficPolicy Cluster (a node address is seen) and Local (the
  client's own address is seen; a node without a local pod drops the traffic);
- S7: a multi-port Service; and a refused connection for a Service without endpoints;
- S8: cluster DNS: dnsmasq pods behind a kube-dns ClusterIP, queried with dig over UDP
  and TCP from a pod and from the node.

Everything it made is removed at the end, also on Ctrl-C or SIGTERM. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from pyproxy.demo import dns
from pyproxy.demo import manifests as m
from pyproxy.demo.cluster import Cluster, build
from pyproxy.demo.lab import CLIENT_IP, Lab

ALL = ("pa", "pb", "pc")
AFFINITY_IP = "10.96.0.10"


def say(text: str = "") -> None:
    print(text, flush=True)


def shell(where: str, command: str) -> None:
    say(f"\n  {where}$ {command}")


def show(lines: Sequence[str]) -> None:
    for line in lines:
        say(f"    {line}")


def pod_of(line: str) -> str:
    found = re.search(r"From=(\S+)", line)
    return found.group(1) if found else "?"


def uniq_c(lines: Sequence[str]) -> list[str]:
    counts = collections.Counter(f"From={pod_of(line)}" for line in lines)
    return [f"{n:7d} {what}" for what, n in sorted(counts.items())]


def affinity_service(cluster: Cluster, timeout: int | None) -> None:
    cluster.apply(
        m.service("sample-session-affinity", AFFINITY_IP, [m.port(8080, 80)], affinity_timeout=timeout),
        m.endpoint_slice("sample-session-affinity", cluster.backends(*ALL), [m.slice_port(80)]),
        name="sample-session-affinity.yaml",
    )


S1_TIMEOUT = 3  # timeoutSeconds in S1 (SCENARIOS.md says 10; the demo need not wait that long)
S1_SILENCE = 4  # seconds of silence before each fresh-pick try: more than the timeout
S1_TRIES = 8


def s1(cluster: Cluster) -> None:
    say(f"\n== S1: ClusterIP with sessionAffinity: ClientIP, timeoutSeconds: {S1_TIMEOUT} ==")
    affinity_service(cluster, timeout=S1_TIMEOUT)
    url = f"{AFFINITY_IP}:8080"
    shell("client-pod", f"for i in 1 2 3; do curl http://{url}/; sleep 1; done   # within the timeout")
    first = cluster.run("cl", "http", url, "--count", "3", "--interval", "1")
    show(first)
    say(f"  -> the same pod each time: {pod_of(first[0])}; each new connection slides the expiry")
    say(f"  after more than {S1_TIMEOUT} s of silence the pin has expired and the next connection gets a")
    say(f"  fresh pick: random over 3 pods, so it may land on {pod_of(first[0])} again. Repeat silence and")
    say(f"  curl until a fresh pick lands elsewhere (at most {S1_TRIES} times):")
    seen = {pod_of(first[0])}
    for attempt in range(1, S1_TRIES + 1):
        shell("client-pod", f"sleep {S1_SILENCE}; curl http://{url}/   # try {attempt}")
        time.sleep(S1_SILENCE)
        line = cluster.run("cl", "http", url)
        show(line)
        if pod_of(line[0]) not in seen:
            say("  -> a fresh pick landed on another pod, as kube-proxy's conformance test expects")
            break
        say(f"  -> {pod_of(line[0])} again: a fresh pick that chose the same pod")
    else:
        say(f"  -> {S1_TRIES} fresh picks happened to choose the same pod (chance 1 in {3 ** S1_TRIES})")


def s2(cluster: Cluster) -> None:
    say("\n== S2: sessionAffinity switched off and back on, by editing the manifest ==")
    url = f"{AFFINITY_IP}:8080"
    affinity_service(cluster, timeout=None)
    shell("node", "edit sample-session-affinity.yaml: sessionAffinity: None")
    shell("client-pod", f"for i in 1 2 3 4 5 6; do curl -s http://{url}/; done")
    show(cluster.run("cl", "http", url, "--count", "6"))
    affinity_service(cluster, timeout=10800)
    shell("node", "edit sample-session-affinity.yaml: sessionAffinity: ClientIP")
    shell("client-pod", f"for i in 1 2 3 4 5 6; do curl -s http://{url}/; done")
    show(cluster.run("cl", "http", url, "--count", "6"))


def s3(cluster: Cluster) -> None:
    say("\n== S3: a hundred requests, one pod ==")
    url = f"{AFFINITY_IP}:8080"
    affinity_service(cluster, timeout=10800)
    shell("client-pod", f"for i in $(seq 100); do curl -s http://{url}/; done | sort | uniq -c   # ClientIP")
    show(uniq_c(cluster.run("cl", "http", url, "--count", "100")))
    affinity_service(cluster, timeout=None)
    shell("client-pod", f"for i in $(seq 100); do curl -s http://{url}/; done | sort | uniq -c   # None")
    show(uniq_c(cluster.run("cl", "http", url, "--count", "100")))


def s5(cluster: Cluster) -> None:
    say("\n== S5: externalTrafficPolicy Cluster vs Local (NodePort 30085) ==")
    say("  pods: pa on node1 (192.168.56.101); pb, pc on node2 (192.168.56.102)")
    ports = [m.port(80, 80, node_port=30085)]
    pods = m.endpoint_slice("s5", cluster.backends(*ALL), [m.slice_port(80)])
    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort"), pods, name="s5.yaml")
    shell("client 192.168.56.100", "curl http://192.168.56.101:30085/   # Cluster, x4")
    show(cluster.run("client", "http", "192.168.56.101:30085", "--count", "4"))
    say("  -> any pod, on any node; the pod sees a node address, not 192.168.56.100")
    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort", external_policy="Local"), pods,
                  name="s5.yaml")
    for node_ip in ("192.168.56.101", "192.168.56.102"):
        shell("client 192.168.56.100", f"curl http://{node_ip}:30085/   # Local, x3")
        show(cluster.run("client", "http", f"{node_ip}:30085", "--count", "3"))
    say(f"  -> each node answers from its own pods, and the pods see ClientIP={CLIENT_IP}")
    cluster.apply(m.service("s5", "10.96.0.11", ports, type="NodePort", external_policy="Local"),
                  m.endpoint_slice("s5", cluster.backends("pb", "pc"), [m.slice_port(80)]), name="s5.yaml")
    shell("client 192.168.56.100", "curl --max-time 1 http://192.168.56.101:30085/   # pa gone from node1")
    show(cluster.run("client", "connect", "192.168.56.101:30085", "--timeout", "1"))
    say("  -> node1 has no local pod: the traffic is dropped (a load balancer's health check sees 503)")


def s7_and_refusal(cluster: Cluster) -> None:
    say("\n== S7: one Service, two ports (80 -> 8080 'http', 443 -> 8443 'https') ==")
    cluster.apply(
        m.service("multi", "10.96.0.13", [m.port(80, "http", name="http"), m.port(443, "https", name="https")]),
        m.endpoint_slice("multi", cluster.backends(*ALL), [m.slice_port(8080, name="http"),
                                                          m.slice_port(8443, name="https")]),
        name="multi.yaml",
    )
    for port in (80, 443):
        shell("client", f"who 10.96.0.13:{port}")
        show(cluster.run("client", "who", f"10.96.0.13:{port}", "--count", "2"))
    say("\n== A Service without endpoints: refused at once, not a hang ==")
    cluster.apply(m.service("empty", "10.96.0.16", [m.port(80, 80)]),
                  m.endpoint_slice("empty", [], [m.slice_port(80)]), name="empty.yaml")
    shell("client", "connect 10.96.0.16:80   # outcome and milliseconds")
    show(cluster.run("client", "connect", "10.96.0.16:80", "--timeout", "3"))


def s8_dns(cluster: Cluster) -> None:
    say("\n== S8: cluster DNS, a Service over UDP (and TCP) port 53 ==")
    say(f"  kube-system/kube-dns {dns.CLUSTER_DNS_IP}:53 -> dnsmasq pods dns1 (node1) and dns2 (node2)")
    dns.setup_cluster_dns(cluster)
    for where in ("client-pod", "node1"):
        shell(where, f"dig +short @{dns.CLUSTER_DNS_IP} ...")
        show(dns.show_lookups(cluster, "cl" if where == "client-pod" else where))


SCENES: dict[str, Callable[[Cluster], None]] = {
    "s1": s1, "s2": s2, "s3": s3, "s5": s5, "s7": s7_and_refusal, "dns": s8_dns,
}


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyproxy demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default=",".join(SCENES), help=f"scenes to play, of {','.join(SCENES)}")
    parser.add_argument("--keep-logs", action="store_true", help="keep the proxies' logs and print where")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("pyproxy demo needs root (network namespaces, nftables, TPROXY)")
        return 1
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            say(f"pyproxy demo needs '{tool}' (apt-get install iproute2 nftables)")
            return 1
    scenes = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in scenes if s not in SCENES]
    if unknown:
        say(f"unknown scene(s): {', '.join(unknown)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-demo-"))
    lab = Lab()
    try:
        say("building: client, node1 and node2 running pyproxy, echo pods pa (node1), pb and pc (node2)")
        cluster = build(lab, workdir)
        lab.add_pod("cl", "node1")  # a client pod on node1
        for scene in scenes:
            SCENES[scene](cluster)
        say("\ndone.")
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    except (AssertionError, subprocess.SubprocessError, OSError) as err:
        say(f"\ndemo failed: {err}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # let the clean-up finish
            signal.signal(sig, signal.SIG_IGN)
        lab.close()
        if args.keep_logs:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        say(f"removed every namespace ({lab.prefix}-*) and process the demo made")


if __name__ == "__main__":
    sys.exit(main())
