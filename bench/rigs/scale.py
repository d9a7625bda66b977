"""`python -m bench.scale --services N`: pyproxy's control plane against kube-proxy's, through a real API server.

Shape: the realapi tier's etcd + kube-apiserver (tests/realapi/kube.py, on the root
namespace's loopback) and its forwarder (tests/realapi/forward.py) at API_IP on a lab LAN
(pyproxy.demo.lab); two lab nodes, node1 running pyproxy in `--kubeconfig` mode and node2
kube-proxy v1.37.2 `--proxy-mode nftables` (bench/build-kube-proxy.sh, the same Kubernetes
release), both watching the same API server; an echo server at BACKEND_IP on the LAN; a
prober (bench/rigs/scaleprobe.py) in each node. N filler Services with one EndpointSlice of
10 endpoints each are written first (bench/rigs/scaleapi.py), plus a `sentinel` Service on
the echo server, and a Node object per lab node with its address.

Measured, for both proxies in the same run, as ratios to kube-proxy:
- first served: process start -> the sentinel answers through the node (every object is
  known by then: it was written last); the CPU used and the RSS at that moment; pyproxy's
  first sync (its log's first "synced N services" line);
- endpoints to routed, `--rounds` times: a new Service (given 1.5 s to be known), then its
  slice; from the API server's 201 for the slice to the first answer at each node's prober
  (probing every ms since before the create);
- CPU under `--rate` slice updates per second for `--duration` s (utime+stime+cutime+cstime of the
  process and its descendants from /proc, over the wall time), and RSS / peak RSS at the end.
- memory: RSS summed over the process tree (a page shared by pyproxy's supervisor, serving
  process and standby counts three times) and PSS summed over it (each page once, shared
  ones divided among their processes: what the node pays), with each process's share.

Rules kept: every wait bounded; the lab's namespaces and every process started here (API
server, etcd, forwarder, proxies, probers, echo) are ended by PID and deleted on any exit,
also on SIGTERM; kube-proxy gets a configuration that touches no global sysctl (conntrack
maxPerCore/min 0, timeouts 0) and runs in its node namespace only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from collections.abc import Callable

from bench.rigs.scaleapi import Api, populate, run_parallel
from pyproxy.demo.lab import Lab, node_ip, pod_cidr
from tests.realapi.kube import KubeAPIServer, KubeOptions, build_binaries

REPO = Path(__file__).resolve().parents[2]
FORWARDER = REPO / "tests" / "realapi" / "forward.py"
BUILD_KUBE_PROXY = REPO / "bench" / "build-kube-proxy.sh"
API_IP, API_PORT = "192.168.56.2", 6443
BACKEND_IP = "192.168.56.50"
NODES = {"pyproxy": ("node1", 1), "kube-proxy": ("node2", 2)}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVE_TIMEOUT = 600.0
ROUTE_TIMEOUT = 30.0


@dataclass
class Contender:
    name: str
    node: str
    proc: subprocess.Popen[Any]
    log: Path
    started: float  # monotonic s
    started_wall: float
    figures: dict[str, Any] = field(default_factory=dict)


# /proc figures of a process and its descendants


def tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime (reaped children: nft)
        except (OSError, ValueError, IndexError):
            continue
    return total / CLK_TCK


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) in MiB, summed over the tree (pages shared by two processes count twice)."""
    rss = hwm = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return rss / 1024, hwm / 1024


def pss_mib(pid: int) -> tuple[float, dict[str, dict[str, float]]]:
    """PSS summed over the tree, in MiB: each shared page counted once in all, divided among the
    processes that map it (what the node pays), and each process's RSS / PSS / private pages."""
    total, each = 0, {}
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip()
                          and v.split()[0].isdigit()}
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        total += fields.get("Pss", 0)
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        name = f"{p} {b' '.join(argv[:4]).decode(errors='replace')[:80]}"
        each[name] = {"rss": round(fields.get("Rss", 0) / 1024, 1), "pss": round(fields.get("Pss", 0) / 1024, 1),
                      "private": round(private / 1024, 1)}
    return total / 1024, each


# the lab's helpers


class Prober:
    def __init__(self, lab: Lab, node: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(node), sys.executable, "-m", "bench.rigs.scaleprobe"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        lab.processes.append(self.proc)
        if self._line(20) != "ready":
            raise RuntimeError(f"prober in {node} did not start")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def start(self, ip: str, port: int, timeout: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"probe {ip} {port} {timeout}\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> float | None:
        """Monotonic seconds of the first answer of the running probe, or None."""
        words = self._line(timeout + 5).split()
        return int(words[1]) / 1e9 if len(words) == 2 and words[0] == "ok" else None


class Profiler:
    """py-spy on pyproxy's process tree for one phase (`--pyspy DIR`; its own CPU is not
    pyproxy's, but it slows the sampled process a little: profile runs are not measurement runs)."""

    def __init__(self, directory: str | None, pid: int, phase: str) -> None:
        self.proc: subprocess.Popen[Any] | None = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            spy = Path(sys.executable).parent / "py-spy"
            self.proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
                                          "--format", "raw", "-o", str(Path(directory) / f"{phase}.txt"),
                                          "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_forwarder(lab: Lab, kube: KubeAPIServer, workdir: Path) -> None:
    with open(workdir / "forwarder.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, str(FORWARDER), "--netns", f"/run/netns/{lab.ns('api')}",
             "--listen", f"{API_IP}:{API_PORT}", "--to", f"127.0.0.1:{kube.port}"],
            stdout=subprocess.PIPE, stderr=log, text=True)
    lab.processes.append(proc)
    assert proc.stdout is not None
    with proc.stdout:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        if not (ready and proc.stdout.readline().startswith("ready")):
            raise RuntimeError("forwarder did not start")


def build_kube_proxy() -> Path:
    out = subprocess.run(["bash", str(BUILD_KUBE_PROXY)], stdout=subprocess.PIPE, text=True,
                         timeout=3 * 3600, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def kube_proxy_config(workdir: Path, kube: KubeAPIServer, node: str) -> Path:
    config = json.loads(kube.kubeconfig_path.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://{API_IP}:{API_PORT}"
    kubeconfig = workdir / "kube-proxy.kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    path = workdir / "kube-proxy.yaml"
    # JSON is YAML. Conntrack all 0: kube-proxy leaves the (global) conntrack sysctls alone.
    path.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "nftables", "hostnameOverride": node, "clusterCIDR": "10.244.0.0/16",
        "bindAddress": "0.0.0.0", "healthzBindAddress": "0.0.0.0:10256", "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                      "udpTimeout": "0s", "udpStreamTimeout": "0s"},
    }))
    return path


def first_sync(log: Path, started_wall: float) -> tuple[float, float, float | None] | None:
    """pyproxy's first "synced N services" line: (seconds after start, the sync's ms, and its
    ms of CPU when the line says: "in W ms (C ms of CPU)")."""
    for line in log.read_text(errors="replace").splitlines():
        if " synced " in line and " services " in line:
            try:
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                words = line.rsplit(" in ", 1)[1].split()
                took = float(words[0])
                cpu = float(words[2].lstrip("(")) if len(words) > 3 and words[3:5] == ["ms", "of"] else None
            except (ValueError, IndexError):
                return None
            return stamp - started_wall, took, cpu
    return None


# the run


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bin_dir = build_binaries()
    kube_proxy_bin = build_kube_proxy()
    result: dict[str, Any] = {"services": args.services, "endpoints_per_slice": 10, "rate": args.rate,
                              "duration": args.duration, "rounds": args.rounds}
    options = KubeOptions(extra_ips=(API_IP,), ready_timeout=180.0)
    with KubeAPIServer(bin_dir, workdir, options) as kube, Lab() as lab:
        lab.build_lan()
        lab.add_ns("api")
        lab.join_lan("api", API_IP)
        for node, index in NODES.values():
            lab.add_node(node, index)
        lab.add_ns("be")
        lab.join_lan("be", BACKEND_IP)
        lab.start_echo("be", tcp=(80,))
        start_forwarder(lab, kube, workdir)
        api = Api("127.0.0.1", kube.port, kube.token, str(kube.ca_cert_path))
        for node, index in NODES.values():
            api.create_node(node, node_ip(index), pod_cidr(index))
        result["populate_s"] = round(populate(api, 0, args.services, args.threads), 1)
        print(f"[scale] {args.services} Services + slices written in {result['populate_s']} s", file=sys.stderr)
        sentinel = api.create_service("sentinel", 80, 80)
        api.create_slice("sentinel", [BACKEND_IP], 80)
        probers = {name: Prober(lab, node) for name, (node, _) in NODES.items()}
        contenders = start_contenders(args, lab, kube, workdir, kube_proxy_bin)
        profiler = Profiler(args.pyspy if args.profile_start else None, contenders["pyproxy"].proc.pid, "start")
        # first served
        for name, prober in probers.items():
            prober.start(sentinel, 80, SERVE_TIMEOUT)
        for name, prober in probers.items():
            c = contenders[name]
            answered = prober.result(SERVE_TIMEOUT)
            if answered is None:
                raise RuntimeError(f"{name} did not serve in {SERVE_TIMEOUT}s: {c.log.read_text()[-3000:]}")
            c.figures["first_served_s"] = round(answered - c.started, 2)
            c.figures["cpu_to_first_served_s"] = round(cpu_seconds(c.proc.pid), 2)
        profiler.stop()
        synced = first_sync(contenders["pyproxy"].log, contenders["pyproxy"].started_wall)
        if synced is not None:
            contenders["pyproxy"].figures["first_sync_s"] = round(synced[0], 2)
            contenders["pyproxy"].figures["first_sync_own_ms"] = synced[1]
            if synced[2] is not None:
                contenders["pyproxy"].figures["first_sync_cpu_ms"] = synced[2]
        time.sleep(args.settle)
        for c in contenders.values():
            c.figures["rss_after_first_sync_mib"] = round(memory_mib(c.proc.pid)[0], 1)
            pss, each = pss_mib(c.proc.pid)
            c.figures["pss_after_first_sync_mib"], c.figures["memory_after_first_sync"] = round(pss, 1), each
        print(f"[scale] first served: {[(c.name, c.figures) for c in contenders.values()]}", file=sys.stderr)
        routed(args, api, probers, contenders)
        updates(args, api, contenders)
        for c in contenders.values():
            rss, peak = memory_mib(c.proc.pid)
            c.figures["rss_end_mib"], c.figures["peak_rss_mib"] = round(rss, 1), round(peak, 1)
            c.figures["pss_end_mib"] = round(pss_mib(c.proc.pid)[0], 1)
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited: {c.log.read_text()[-3000:]}")
        result["contenders"] = {c.name: c.figures for c in contenders.values()}
        if args.pyspy:  # after the measurements, which py-spy would slow: the same phases again, profiled
            profiled = argparse.Namespace(**{**vars(args), "rounds": 3, "duration": min(args.duration, 20.0)})
            scratch = {name: Contender(c.name, c.node, c.proc, c.log, c.started, c.started_wall)
                       for name, c in contenders.items()}
            profiler = Profiler(args.pyspy, contenders["pyproxy"].proc.pid, "routed")
            routed(profiled, api, probers, scratch, prefix="prof")
            profiler.stop()
            profiler = Profiler(args.pyspy, contenders["pyproxy"].proc.pid, "updates")
            updates(profiled, api, scratch)
            profiler.stop()
        for prober in probers.values():
            assert prober.proc.stdin is not None
            prober.proc.stdin.write("quit\n")
            prober.proc.stdin.flush()
        if args.keep_logs:
            for c in contenders.values():
                target = Path(args.keep_logs) / f"{c.name}.log"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(c.log.read_text(errors="replace"))
    return result


def start_contenders(args: argparse.Namespace, lab: Lab, kube: KubeAPIServer, workdir: Path,
                     kube_proxy_bin: Path) -> dict[str, Contender]:
    node1, node2 = NODES["pyproxy"][0], NODES["kube-proxy"][0]
    pyproxy_args = [sys.executable, "-m", "pyproxy", "--kubeconfig", str(kube.kubeconfig_path),
                    "--master", f"https://{API_IP}:{API_PORT}", "--hostname-override", node1,
                    "--healthz-bind-address", "0.0.0.0:10256", "--state-dir", str(workdir / "state-node1")]
    kp_args = [str(kube_proxy_bin), "--config", str(kube_proxy_config(workdir, kube, node2)), "--v=2"]
    out: dict[str, Contender] = {}
    for name, node, argv in (("pyproxy", node1, pyproxy_args), ("kube-proxy", node2, kp_args)):
        log = workdir / f"{name}.log"
        started, wall = time.monotonic(), time.time()
        if name == "pyproxy" and args.pyproxy_tree:  # another pyproxy source tree (a before/after comparison)
            argv = ["env", "-C", args.pyproxy_tree, *argv]  # `-m` puts the working directory first
        out[name] = Contender(name, node, lab.spawn(node, argv, log=log), log, started, wall)
    return out


def routed(args: argparse.Namespace, api: Api, probers: dict[str, Prober], contenders: dict[str, Contender],
           prefix: str = "probe") -> None:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(args.rounds):
        name = f"{prefix}{i}"
        ip = api.create_service(name, 80, 80)
        time.sleep(1.5)  # both proxies know the Service (without endpoints) first
        for prober in probers.values():
            prober.start(ip, 80, ROUTE_TIMEOUT)
        time.sleep(0.05)
        api.create_slice(name, [BACKEND_IP], 80)
        created = time.monotonic()
        for pname, prober in probers.items():
            answered = prober.result(ROUTE_TIMEOUT)
            if answered is None:
                raise RuntimeError(f"{pname}: {name} not routed in {ROUTE_TIMEOUT}s")
            samples[pname].append((answered - created) * 1000)
        print(f"[scale] round {i}: " + " ".join(f"{k}={v[-1]:.1f}ms" for k, v in samples.items()), file=sys.stderr)
        time.sleep(args.gap)
    for pname, values in samples.items():
        contenders[pname].figures["routed_ms"] = {"p50": round(statistics.median(values), 1),
                                                  "p99": round(pct(values, 0.99), 1),
                                                  "max": round(max(values), 1), "all": [round(v, 1) for v in values]}


def updates(args: argparse.Namespace, api: Api, contenders: dict[str, Contender]) -> None:
    """`rate` slice updates per second for `duration` s, on a fixed schedule; CPU over it."""
    total = int(args.rate * args.duration)
    rng = random.Random(7)
    before = {name: cpu_seconds(c.proc.pid) for name, c in contenders.items()}
    start = time.monotonic()
    late = 0

    def one(k: int) -> None:
        nonlocal late
        delay = start + k / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.1:
            late += 1
        api.move_slice(rng.randrange(args.services), k + 1)

    run_parallel([functools.partial(one, k) for k in range(total)], 4)
    wall = time.monotonic() - start
    for name, c in contenders.items():
        c.figures["cpu_under_updates_pct"] = round(100 * (cpu_seconds(c.proc.pid) - before[name]) / wall, 1)
    if late:
        print(f"[scale] {late} of {total} updates went out more than 100 ms late", file=sys.stderr)


# the report


RATIO_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], float]], ...] = (
    ("endpoints to routed p50 (ms)", lambda f: f["routed_ms"]["p50"]),
    ("endpoints to routed p99 (ms)", lambda f: f["routed_ms"]["p99"]),
    ("endpoints to routed max (ms)", lambda f: f["routed_ms"]["max"]),
    ("CPU under updates (% of a core)", lambda f: f["cpu_under_updates_pct"]),
    ("start to first served (s)", lambda f: f["first_served_s"]),
    ("CPU to first served (s)", lambda f: f["cpu_to_first_served_s"]),
    ("RSS after first sync, summed over the processes (MiB)", lambda f: f["rss_after_first_sync_mib"]),
    ("PSS after first sync, summed over the processes (MiB)", lambda f: f["pss_after_first_sync_mib"]),
    ("peak RSS (MiB)", lambda f: f["peak_rss_mib"]),
)


def table(result: dict[str, Any]) -> str:
    c = result["contenders"]
    py, kp = c["pyproxy"], c["kube-proxy"]
    lines = [f"| {result['services']} Services x 10 endpoints | pyproxy | kube-proxy nftables | ratio |",
             "|---|---|---|---|"]
    for label, get in RATIO_ROWS:
        a, b = get(py), get(kp)
        lines.append(f"| {label} | {a} | {b} | {a / b:.2f}x |" if b else f"| {label} | {a} | {b} | - |")
    if "first_sync_s" in py:
        cpu = f" ({py['first_sync_cpu_ms']} of CPU)" if "first_sync_cpu_ms" in py else ""
        lines.append(f"| pyproxy's first sync: after start (s) / its own time (ms) | "
                     f"{py['first_sync_s']} / {py['first_sync_own_ms']}{cpu} | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10, help="endpoints-to-routed samples")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between two samples")
    p.add_argument("--rate", type=float, default=20.0, help="slice updates per second for the CPU figure")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of slice updates")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after first served before measuring")
    p.add_argument("--threads", type=int, default=16, help="API writer threads")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--pyspy", help="after measuring, profile pyproxy with py-spy through the phases again "
                   "(raw stacks per phase into this directory)")
    p.add_argument("--profile-start", action="store_true", help="with --pyspy: also profile the start (slows it)")
    p.add_argument("--pyproxy-tree", help="run pyproxy from this source tree (default: this checkout)")
    p.add_argument("--keep-logs", help="copy the proxies' logs into this directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.scale needs root (network namespaces)", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="pyproxy-scale-") as tmp:
        result = measure(args, Path(tmp))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
