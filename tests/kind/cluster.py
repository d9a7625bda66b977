"""A kind cluster (a control plane and one worker, or more) with kube-proxy off, on one of two pod networks, offline.

Rules it keeps:
- The cluster is kind's own (`kind create cluster`), from the node image of images.py, with
  `kubeProxyMode: none` and kind's default CNI off; kubeadm is pointed at the local images
  (`imageRepository`), and the kubelet is allowed on cgroup v1 (`failCgroupV1: false`).
- Pod networks (`CNIS`), installed once the nodes have their `spec.podCIDR`:
  - `routed`: Debian's `ptp` plugin, a veth per pod routed by the node (kindnetd's shape);
  - `bridge`: Debian's `bridge` plugin, pods on `cni0` with the gateway address on the bridge
    (flannel's, kubenet's shape); br_netfilter's `bridge-nf-call-iptables` stays at the
    node's default (1, which kubeadm requires) and is never changed.
  Each node routes the other's pod CIDR via the other's node address.
- The `routed` cluster is dual-stack (`DUAL_STACK`: kind's `ipFamily: dual`, pod CIDRs
  10.244.0.0/16 and fd00:10:244::/56, services 10.96.0.0/16 and fd00:10:96::/112): its CNI
  config has a range of each family, and the inter-node routes are set for both. kind
  makes its docker network `kind` with an IPv6 subnet; one left from before without IPv6
  is removed first (kind reuses an existing network as it is).
- The API server is reached through the daemon's namespace (`kubectl()` enters it), with a
  kubeconfig in /run/pyproxy-kind, never root's ~/.kube/config.
- Two nodes by default (`workers=1`: every tier's shape); more workers for the e2e specs
  that need three zones of two nodes (`cmd/kind up --workers 6`). Every node routes every
  other node's pod CIDRs.
- `delete()` removes the cluster, and /lib/modules where docker made it for kind's mount.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.kind import images
from tests.kind.dockerd import RUN, Daemon

NAME = "kind"  # daemonset.yaml's default apiServer is https://kind-control-plane:6443
KUBECONFIG = RUN / "kubeconfig"
CNIS = ("routed", "bridge")
DUAL_STACK = frozenset({"routed"})  # the pod networks whose cluster is dual-stack (IPv4 and IPv6)
MODULES_MARK = RUN / "made-lib-modules"
MAX_WORKERS = 6  # three zones of two workers: what the largest e2e specs ask for


class ClusterError(RuntimeError):
    """The cluster could not be made, reached or removed."""


def kind_config(dual_stack: bool = False, workers: int = 1) -> str:
    """kind's cluster config: a control plane and `workers` workers, no kube-proxy, no
    default CNI, local images."""
    family = "\n  ipFamily: dual" if dual_stack else ""
    worker_nodes = "".join("\n  - role: worker" for _ in range(workers))
    return f"""kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:{family}
  kubeProxyMode: none
  disableDefaultCNI: true
nodes:
  - role: control-plane{worker_nodes}
kubeadmConfigPatches:
  - |
    kind: ClusterConfiguration
    imageRepository: {images.REGISTRY}
    etcd:
      local:
        imageTag: {images.ETCD_TAG}
    dns:
      imageTag: {images.COREDNS_TAG}
  - |
    kind: KubeletConfiguration
    failCgroupV1: false
"""


def cni_config(cni: str, pod_cidrs: str | list[str]) -> str:
    """The node's CNI conflist for `cni` with its pod CIDRs (one range, and a default
    route, per family)."""
    cidrs = [pod_cidrs] if isinstance(pod_cidrs, str) else pod_cidrs
    ipam = {"type": "host-local", "ranges": [[{"subnet": cidr}] for cidr in cidrs],
            "routes": [{"dst": "::/0" if ":" in cidr else "0.0.0.0/0"} for cidr in cidrs]}
    if cni == "routed":
        main: dict[str, object] = {"type": "ptp", "ipMasq": False, "ipam": ipam}
    elif cni == "bridge":
        main = {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True, "ipam": ipam}
    else:
        raise ValueError(f"unknown pod network {cni!r} (one of {', '.join(CNIS)})")
    return json.dumps({
        "cniVersion": "1.0.0", "name": f"pyproxy-{cni}",
        "plugins": [main, {"type": "portmap", "capabilities": {"portMappings": True}}],
    }, indent=2)


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    pod_cidr: str
    address6: str = ""  # dual-stack: the node's IPv6 InternalIP
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs: one per family


@dataclass(frozen=True)
class Cluster:
    daemon: Daemon
    cni: str

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = self.daemon.netns_cmd(str(images.BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", *args)
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def node_exec(self, node: str, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(["docker", "exec", node, *argv], env=self.daemon.env,
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise ClusterError(f"{node}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def nodes(self) -> list[Node]:
        out = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        found = []
        for item in out["items"]:
            internal = [a["address"] for a in item["status"]["addresses"] if a["type"] == "InternalIP"]
            addr = next(a for a in internal if ":" not in a)
            addr6 = next((a for a in internal if ":" in a), "")
            found.append(Node(item["metadata"]["name"], addr, item["spec"].get("podCIDR", ""), addr6,
                              tuple(item["spec"].get("podCIDRs", ()))))
        return sorted(found, key=lambda n: n.name)

    def netns_run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in the daemon's namespace: a host outside the cluster, on its network."""
        return subprocess.run(self.daemon.netns_cmd(*argv), capture_output=True, text=True, timeout=timeout)


def _kind(daemon: Daemon, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(["kind", *args], env=daemon.env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ClusterError(f"kind {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def exists(daemon: Daemon) -> bool:
    return NAME in _kind(daemon, "get", "clusters").split()


def _wait_pod_cidrs(cluster: Cluster, count: int, timeout_s: float = 120) -> list[Node]:
    deadline = time.monotonic() + timeout_s
    families = 2 if cluster.cni in DUAL_STACK else 1
    while time.monotonic() < deadline:
        nodes = cluster.nodes()
        if len(nodes) == count and all(n.pod_cidr and len(n.pod_cidrs) >= families for n in nodes):
            return nodes
        time.sleep(1)
    raise ClusterError("nodes got no spec.podCIDR in time")


def install_cni(cluster: Cluster, count: int) -> None:
    """Write each node's CNI config and the routes to the other nodes' pods."""
    nodes = _wait_pod_cidrs(cluster, count)
    for node in nodes:
        conf = cni_config(cluster.cni, list(node.pod_cidrs) or [node.pod_cidr])
        cluster.node_exec(node.name, "sh", "-c", f"cat > /etc/cni/net.d/10-pyproxy.conflist <<'EOF'\n{conf}\nEOF")
        for other in nodes:
            if other is not node:
                cluster.node_exec(node.name, "ip", "route", "replace", other.pod_cidr, "via", other.address)
                for cidr in other.pod_cidrs:
                    if ":" in cidr and other.address6:
                        cluster.node_exec(node.name, "ip", "-6", "route", "replace", cidr, "via", other.address6)


def wait_ready(cluster: Cluster, timeout_s: float = 180) -> None:
    cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={int(timeout_s)}s",
                    timeout=timeout_s + 10)


def create(daemon: Daemon, cni: str, workers: int = 1) -> Cluster:
    """Make the cluster on pod network `cni` with `workers` workers (deleting an old one
    first); nodes Ready."""
    if cni not in CNIS:
        raise ValueError(f"unknown pod network {cni!r} (one of {', '.join(CNIS)})")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers: {workers} is not between 1 and {MAX_WORKERS}")
    if exists(daemon):
        delete(daemon)
    if not Path("/lib/modules").exists():
        MODULES_MARK.parent.mkdir(parents=True, exist_ok=True)
        MODULES_MARK.touch()  # docker will create it for kind's bind mount; down removes it
    if cni in DUAL_STACK:
        _network_with_ipv6(daemon)
    config = RUN / "kind-config.yaml"
    config.write_text(kind_config(dual_stack=cni in DUAL_STACK, workers=workers))
    _kind(daemon, "create", "cluster", f"--name={NAME}", f"--image={images.NODE_IMAGE}",
          f"--config={config}", f"--kubeconfig={KUBECONFIG}", "--retain")
    cluster = Cluster(daemon, cni)
    install_cni(cluster, workers + 1)
    wait_ready(cluster)
    return cluster


def _network_with_ipv6(daemon: Daemon) -> None:
    """kind reuses an existing `kind` docker network as it is: one without IPv6 (made by an
    older run, or on a daemon without IPv6) is removed so that kind makes it dual-stack."""
    proc = subprocess.run(["docker", "network", "inspect", "kind", "--format", "{{.EnableIPv6}}"],
                          env=daemon.env, capture_output=True, text=True, timeout=30)
    if proc.returncode == 0 and proc.stdout.strip() != "true":
        subprocess.run(["docker", "network", "rm", "kind"], env=daemon.env, capture_output=True, text=True,
                       timeout=30, check=True)


def load(daemon: Daemon, *names: str) -> None:
    """Load docker images into every node: one `kind load` for them all, so that the layers
    they share are saved and imported once."""
    _kind(daemon, "load", "docker-image", f"--name={NAME}", *names)


def delete(daemon: Daemon) -> None:
    if exists(daemon):
        _kind(daemon, "delete", "cluster", f"--name={NAME}", f"--kubeconfig={KUBECONFIG}")
    modules = Path("/lib/modules")
    if MODULES_MARK.exists() and modules.is_dir() and not any(modules.iterdir()):
        modules.rmdir()
        MODULES_MARK.unlink()
