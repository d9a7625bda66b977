"""The contenders of shared/BENCH.md: what each one is, and its configuration text.

Rules kept here:
- A `Contender` is a frozen description: the address the client targets, the files to
  write, the command to run in the node namespace (none for `direct` and `dnat`), the nft
  script loaded while it is measured (dnat), and whether it must run alone (pyproxy owns
  its own nftables table and listeners, so it is started for its own measurement only, and
  its `--cleanup` removes what it left, so the other contenders never run beside its rules).
- Config renderers are pure functions of addresses; nothing here starts anything.
- Affinity: contenders whose backend set the bench can change (dnat: a reduced ruleset;
  pyproxy: a reduced EndpointSlice, with `sessionAffinity: ClientIP` for that workload) carry a
  `remove_hook` that drops the last backend; the others report stickiness only.
- Each contender listens on its own address or port in the node, so the persistent ones
  (haproxy, nginx, socat) can stay up across rounds without meeting each other's traffic.
- `--contenders` takes families (direct, dnat, haproxy, nginx, socat) or ids; `pyproxy` is
  the id of the default variant (list `pyproxy-pure`, `pyproxy-2w` to add the others).
- The C load generators (bench/loadtool/cload.py: wrk, fortio, iperf3) talk HTTP to nginx on
  HTTP_PORT in every backend, and iperf3 to IPERF_PORT on backend 1 only (its control and
  data connections must meet one server). So each contender also serves those two: `ports`
  maps a backend port to the address the client targets for it (socat serves the bench
  port only; a workload on a port a contender lacks skips it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STATE_ROOT = Path("/tmp/pyproxy-bench-state")  # pyproxy variants' --state-dir parents (contenders.state_dir)
FAMILIES = ("direct", "dnat", "haproxy", "nginx", "socat", "pyproxy")
PYPROXY_CLUSTER_IP = "10.96.0.10"
PYPROXY_HTTP_IP = "10.96.0.12"  # Service bench-http: port 80 -> every backend's HTTP_PORT
PYPROXY_IPERF_IP = "10.96.0.11"  # Service bench-iperf: IPERF_PORT -> backend 1 only
DNAT_VIP = "10.96.0.20"
SERVICE_PORT = 80
BACKEND_PORT = 8080
HTTP_PORT = 8081  # nginx http in each backend (wrk, fortio)
IPERF_PORT = 5201  # iperf3 -s in backend 1
C_PORTS = (HTTP_PORT, IPERF_PORT)
DNAT_TABLE = "pbbench"
PyproxyVariant = tuple[str, Sequence[str]]
PYPROXY_VARIANTS: tuple[PyproxyVariant, ...] = (
    ("pyproxy", ()),  # the default: the splice relay on its compiled engine (copy small reads, splice bulk), one process
    ("pyproxy-pure", ("--pure-python",)),  # the same relay's pure-Python twin (no compiled helpers), one process
    ("pyproxy-2w", ("--workers", "2")),  # the default relay, 2 workers (reuseport + cBPF)
)

Backends = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class Contender:
    id: str
    family: str
    target: tuple[str, int]
    argv: tuple[str, ...] = ()  # run in the node namespace; () = no process
    files: Mapping[str, str] = field(default_factory=dict)  # name -> text, in its work dir
    nft_up: str = ""  # nft script loaded before each measurement
    nft_down: str = ""  # and this after it
    exclusive: bool = False  # started before, stopped after each of its measurements
    cleanup: tuple[str, ...] = ()  # run in the node namespace after it stops (pyproxy --cleanup)
    mode_files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # load mode -> overlay
    remove_hook: tuple[str, ...] = ()  # affinity: removes the last backend (run by the load tool)
    ready_timeout: float = 15.0
    kernel: bool = False  # no proxy process: no per-core figures
    ports: Mapping[int, tuple[str, int]] = field(default_factory=dict)  # backend port -> target (C_PORTS)

    def target_for(self, backend_port: int) -> tuple[str, int] | None:
        """Where the client connects for a service on `backend_port` (None: not served)."""
        return self.target if backend_port == BACKEND_PORT else self.ports.get(backend_port)

    @property
    def has_process(self) -> bool:
        return bool(self.argv)


def max_proxied(nofile: int) -> int:
    """Connections a single-process proxy can carry within an open-files limit: two
    sockets each, less a margin for listeners, logs and the like."""
    return max(64, (nofile - 200) // 2)


def c_backends(backends: Backends, port: int) -> list[tuple[str, int]]:
    """The servers behind a C-tool port: nginx http on every backend, iperf3 on the first."""
    if port == IPERF_PORT:
        return [(backends[0][0], IPERF_PORT)]
    return [(h, port) for h, _ in backends]


Extra = Sequence[tuple[tuple[str, int], Backends]]  # more (listen, servers) pairs


def c_extra(listen_host: str, base_port: int, backends: Backends) -> list[tuple[tuple[str, int], Backends]]:
    """A proxy's listeners for the C-tool ports: base_port + 100 (http), + 200 (iperf3)."""
    return [((listen_host, base_port + 100 * k), c_backends(backends, port)) for k, port in enumerate(C_PORTS, 1)]


def haproxy_config(threads: int, listen: tuple[str, int], backends: Backends, extra: Extra = ()) -> str:
    """No maxconn: HAProxy then derives it from the open-files limit, pipes for splice included."""
    servers = "\n".join(f"    server be{i} {h}:{p}" for i, (h, p) in enumerate(backends, 1))
    more = "".join(
        f"\nfrontend bench{n}\n    bind {lh}:{lp}\n    default_backend bench{n}\n\nbackend bench{n}\n"
        "    balance roundrobin\n" + "\n".join(f"    server be{i} {h}:{p}" for i, (h, p) in enumerate(bes, 1)) + "\n"
        for n, ((lh, lp), bes) in enumerate(extra, 2))
    return f"""global
    nbthread {threads}

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend bench
    bind {listen[0]}:{listen[1]}
    default_backend bench

backend bench
    balance roundrobin
{servers}
{more}"""


def nginx_config(workers: int, listen: tuple[str, int], backends: Backends, workdir: Path,
                 nofile: int = 20000, extra: Extra = ()) -> str:
    servers = "\n".join(f"        server {h}:{p};" for h, p in backends)
    more = "".join(
        f"    upstream bench{n} {{\n" + "".join(f"        server {h}:{p};\n" for h, p in bes) + "    }\n"
        f"    server {{\n        listen {lh}:{lp} reuseport backlog=4096;\n        proxy_pass bench{n};\n"
        "        proxy_connect_timeout 5s;\n        proxy_timeout 120s;\n        proxy_half_close on;\n    }\n"
        for n, ((lh, lp), bes) in enumerate(extra, 2))
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections {nofile - 100};
}}
stream {{
    upstream bench {{
{servers}
    }}
    server {{
        listen {listen[0]}:{listen[1]} reuseport backlog=4096;
        proxy_pass bench;
        proxy_connect_timeout 5s;
        proxy_timeout 120s;
        proxy_half_close on;
    }}
{more}}}
"""


def socat_argv(listen: tuple[str, int], backend: tuple[str, int]) -> tuple[str, ...]:
    return ("socat", f"TCP4-LISTEN:{listen[1]},bind={listen[0]},fork,reuseaddr,backlog=4096,nodelay",
            f"TCP4:{backend[0]}:{backend[1]},nodelay")


def dnat_ruleset(vip: tuple[str, int], backends: Backends, table: str = DNAT_TABLE,
                 extra: Sequence[tuple[int, Backends]] = ()) -> str:
    """kube-proxy's nftables shape: a service-ips verdict map, then numgen over endpoints.
    `extra`: more (vip port, endpoints) services on the same VIP (the C-tool ports)."""
    services = [(vip[1], "service-default-bench-tcp", "endpoint-", backends)]
    services += [(port, f"service-default-bench{k}-tcp", f"endpoint{k}-", bes) for k, (port, bes) in enumerate(extra, 2)]
    elements = ", ".join(f"{vip[0]} . tcp . {port} : goto {chain}" for port, chain, _, _ in services)
    chains = []
    for _, chain, ep, bes in services:
        picks = ", ".join(f"{i} : goto {ep}{i}" for i in range(len(bes)))
        chains.append(f"    chain {chain} {{\n        numgen random mod {len(bes)} vmap {{ {picks} }}\n    }}")
        chains += [f"    chain {ep}{i} {{\n        meta l4proto tcp dnat to {h}:{p}\n    }}" for i, (h, p) in enumerate(bes)]
    body = "\n".join(chains)
    return f"""table ip {table} {{
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {elements} }}
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority -100; policy accept;
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
{body}
}}
"""


def _service(name: str, ip: str, port: int, target: int, hosts: Sequence[str], affinity: bool = False) -> list[object]:
    spec: dict[str, object] = {"clusterIP": ip, "ports": [{"name": "", "protocol": "TCP", "port": port,
                                                            "targetPort": target}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name}, "spec": spec},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"namespace": "default", "name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4", "ports": [{"name": "", "protocol": "TCP", "port": target}],
             "endpoints": [{"addresses": [h], "conditions": {"ready": True}, "nodeName": "node2"} for h in hosts]}]


def pyproxy_c_services(backend_hosts: Sequence[str]) -> str:
    """The C-tool Services: bench-http (port 80 -> HTTP_PORT, every backend) and bench-iperf
    (IPERF_PORT -> backend 1)."""
    docs = (_service("bench-http", PYPROXY_HTTP_IP, SERVICE_PORT, HTTP_PORT, backend_hosts)
            + _service("bench-iperf", PYPROXY_IPERF_IP, IPERF_PORT, IPERF_PORT, backend_hosts[:1]))
    return str(yaml.safe_dump_all(docs, sort_keys=False))


def pyproxy_manifest(backend_hosts: Sequence[str], client_ip_affinity: bool = False) -> str:
    spec: dict[str, object] = {"clusterIP": PYPROXY_CLUSTER_IP, "ports": [
        {"name": "", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": BACKEND_PORT}]}
    if client_ip_affinity:
        spec["sessionAffinity"] = "ClientIP"
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "bench"},
        "spec": spec,
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "bench-1",
                     "labels": {"kubernetes.io/service-name": "bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "", "protocol": "TCP", "port": BACKEND_PORT}],
        "endpoints": [{"addresses": [h], "conditions": {"ready": True}, "nodeName": "node2"}
                      for h in backend_hosts],
    }
    return str(yaml.safe_dump_all([service, slice_], sort_keys=False))


def build(families: Sequence[str], listen_host: str, backends: Backends, workdir: Path,
          variants: Sequence[PyproxyVariant] = PYPROXY_VARIANTS, nofile: int = 20000,
          node_ns: str = "") -> list[Contender]:
    """The contenders of the chosen families, in a stable order; `nofile` is the open-files
    limit they will run under (the proxies are configured to fit inside it)."""
    out: list[Contender] = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family == "direct":
            out.append(Contender("direct", family, backends[0], kernel=True,
                                 ports={p: c_backends(backends, p)[0] for p in C_PORTS}))
        elif family == "dnat":
            vip = (DNAT_VIP, SERVICE_PORT)
            reduced = f"delete table ip {DNAT_TABLE}\n" + dnat_ruleset(vip, backends[:-1])
            vports = {HTTP_PORT: SERVICE_PORT + 1, IPERF_PORT: IPERF_PORT}
            dextra = [(vports[p], c_backends(backends, p)) for p in C_PORTS]
            out.append(Contender("dnat", family, vip, kernel=True, nft_up=dnat_ruleset(vip, backends, extra=dextra),
                                 ports={p: (DNAT_VIP, vports[p]) for p in C_PORTS},
                                 nft_down=f"delete table ip {DNAT_TABLE}\n", files={"reduced.nft": reduced},
                                 remove_hook=("ip", "netns", "exec", node_ns, "nft", "-f",
                                              str(workdir / "dnat" / "reduced.nft"))))
        elif family == "haproxy":
            for port, n in ((8001, 1), (8002, 2)):
                d = workdir / f"haproxy-{n}t"
                extra = c_extra(listen_host, port, backends)
                out.append(Contender(f"haproxy-{n}t", family, (listen_host, port),
                                     argv=("haproxy", "-db", "-f", str(d / "haproxy.cfg")),
                                     files={"haproxy.cfg": haproxy_config(n, (listen_host, port), backends, extra)},
                                     ports={p: lst for p, (lst, _) in zip(C_PORTS, extra)}))
        elif family == "nginx":
            for port, n in ((8003, 1), (8004, 2)):
                d = workdir / f"nginx-{n}w"
                extra = c_extra(listen_host, port, backends)
                out.append(Contender(f"nginx-{n}w", family, (listen_host, port),
                                     argv=("nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")),
                                     files={"nginx.conf": nginx_config(n, (listen_host, port), backends, d, nofile, extra)},
                                     ports={p: lst for p, (lst, _) in zip(C_PORTS, extra)}))
        elif family == "socat":
            out.append(Contender("socat", family, (listen_host, 8005),
                                 argv=socat_argv((listen_host, 8005), backends[0])))
        elif family == "pyproxy":
            hosts = [h for h, _ in backends]
            for label, args in variants:
                d = workdir / label
                out.append(Contender(label, family, (PYPROXY_CLUSTER_IP, SERVICE_PORT), exclusive=True,
                                     argv=(sys.executable, "-m", "pyproxy", "--manifests", str(d / "manifests"),
                                           "--hostname-override", "node1", "--state-dir", str(state_dir(label)), *args),
                                     files={"manifests/bench.yaml": pyproxy_manifest(hosts),
                                            "manifests/c-tools.yaml": pyproxy_c_services(hosts)},
                                     ports={HTTP_PORT: (PYPROXY_HTTP_IP, SERVICE_PORT),
                                            IPERF_PORT: (PYPROXY_IPERF_IP, IPERF_PORT)},
                                     mode_files={"affinity": {
                                         "manifests/bench.yaml": pyproxy_manifest(hosts, True),
                                         "reduced.yaml": pyproxy_manifest(hosts[:-1], True)}},
                                     remove_hook=("mv", str(d / "reduced.yaml"), str(d / "manifests" / "bench.yaml")),
                                     cleanup=(sys.executable, "-m", "pyproxy", "--cleanup"),
                                     ready_timeout=30.0))
    return out


def state_dir(label: str) -> Path:
    """pyproxy's state directory for one variant: short, since its hand-over socket's path
    must fit a unix socket address (a long --out would not); removed by `run` at the end."""
    return STATE_ROOT / f"{os.getpid()}-{label}"


def select(all_contenders: Sequence[Contender], text: str) -> list[Contender]:
    """`--contenders`: comma-separated families (haproxy) or ids (haproxy-1t)."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    known = {c.id for c in all_contenders} | set(FAMILIES)
    unknown = [t for t in tokens if t not in known]
    if unknown or not tokens:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(sorted(known))}")
    ids = {c.id for c in all_contenders}
    families = {t for t in tokens if t not in ids}  # "pyproxy" is an id (the default variant) first
    return [c for c in all_contenders if c.id in tokens or c.family in families]


def threads_of(c: Contender) -> int:
    """How many threads or workers serve: `-2t` (HAProxy), `-2w` (nginx, pyproxy) mean two."""
    return 2 if c.id.endswith(("-2t", "-2w")) else 1
