"""Kubernetes' own e2e suite (`e2e.test`, run by ginkgo) against the kind cluster, offline.

Rules it keeps (../shared/E2E.md has the facts they rest on):
- The suite is built from the same Kubernetes release as the cluster (build-e2e.sh, cached).
  The images its specs run are made here from a Debian root file system and agnhost, and
  loaded into the nodes under the exact names the specs use, so nothing is ever pulled:
  agnhost (with the tools the specs exec: sh, curl, wget, netcat-openbsd, iproute2, dig,
  socat, and porter's certificate), and busybox and nginx stand-ins (the specs only run
  `sh -c` in busybox, and only need nginx pods to run and answer on port 80).
- `--provider=skeleton` (kind's own choice; `local` would add SSH-based specs), run inside
  the docker daemon's network namespace where the API server is reachable. The control
  plane's taint is removed first, so that specs wanting two schedulable nodes run.
- Selections are named (`SELECTIONS`): each a focus and a skip regex over spec names.
  `focused` is the CI set; `broad` every [sig-network] spec that a Service proxy is to pass;
  `dualstack` the Service specs of [Feature:IPv6DualStack] (routed cluster only).
- The result is read from ginkgo's junit report, never from its exit status alone: every
  spec passed, failed (with its message) or skipped, and a one-line summary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tests.kind import cluster, images, rootfs
from tests.kind.dockerd import Daemon

HERE = Path(__file__).resolve().parent
BIN = images.CACHE / "bin-e2e"
E2E_REGISTRY = "registry.k8s.io/e2e-test-images"
AGNHOST = f"{E2E_REGISTRY}/agnhost:2.66.1"
BUSYBOX = f"{E2E_REGISTRY}/busybox:1.37.0-2"
NGINX = f"{E2E_REGISTRY}/nginx:1.27.0-2"
REGRESSION_74839 = f"{E2E_REGISTRY}/regression-issue-74839:1.5"
PAUSE = f"registry.k8s.io/pause:{images.PAUSE_TAG}"  # the sandbox image's binary, under the specs' name
# test/utils/image/manifest.go of the module the suite is built from: where the names come from
MANIFEST = images.CACHE / "gomod" / "k8s.io" / f"kubernetes@{images.K8S_VERSION}" / "test/utils/image/manifest.go"

# Specs that test something other than a Service proxy, never run: kube-proxy's own pods,
# flags and conntrack settings, cloud or hardware load balancers, NetworkPolicy, DNS servers,
# SSH to nodes, alpha/beta features behind gates, and specs that disrupt the cluster.
NOT_A_PROXY = (
    r"\[Feature:|\[Serial\]|\[Disruptive\]|\[Flaky\]|\[Slow\]|LoadBalancer|ESIPP|NetworkPolicy|DNS"
    r"|KubeProxy|kube-proxy should|\[sig-network\] Proxy|Ingress|IngressClass|NoSNAT|SCTP|\[Feature:SCTP"
    r"|HostPort|ClusterDns|ServiceCIDR|IPAddress"
)


@dataclass(frozen=True)
class Selection:
    focus: str
    skip: str
    procs: int = 6


SELECTIONS = {
    # The CI set: Services and the Granular Checks a Service proxy carries, on both networks.
    "focused": Selection(
        focus=(r"\[sig-network\] (Services should (serve a basic endpoint from pods|serve multiport endpoints"
               r"|be able to update service type to NodePort listening on same port number but different protocols"
               r"|have session affinity work for service with type clusterIP|have session affinity work for NodePort"
               r"|be able to switch session affinity for service with type clusterIP"
               r"|be able to switch session affinity for NodePort service"
               r"|be rejected when no endpoints exist|implement service.kubernetes.io/service-proxy-name"
               r"|implement service.kubernetes.io/headless|respect internalTrafficPolicy=Local Pod to Pod"
               r"|serve endpoints on same port and different protocols"
               r"|be able to create a functioning NodePort service|be able to change the type from ClusterIP to NodePort"
               r"|fallback to local terminating endpoints when there are no ready endpoints with externalTrafficPolicy=Local"
               r"|preserve source pod IP for traffic thru service cluster IP"
               r"|work with the pod containing more than 6 DNS search paths and longer than 256 search list characters)"
               r"|Networking Granular Checks: Services should (function for pod-Service|function for node-Service"
               r"|update endpoints|be able to handle large requests|function for service endpoints using hostNetwork)|Conntrack should be able to preserve UDP traffic when server pod cycles"
               r"|EndpointSlice should (support a Service with multiple|create Endpoints and EndpointSlices for Pods matching"
               r"|support multiple ports)|Networking should check kube-proxy urls)"),
        skip=NOT_A_PROXY.replace(r"|kube-proxy should", "")),
    # Every [sig-network] spec a Service proxy is to pass (see docs/e2e.md for what is left out).
    "broad": Selection(focus=r"\[sig-network\]", skip=NOT_A_PROXY),
    # The Service specs of dual-stack (the routed cluster only).
    "dualstack": Selection(focus=r"\[Feature:IPv6DualStack\].*(service|Service)", skip=r"\[Serial\]|\[Disruptive\]|SCTP|sctp"),
}
# The dual-stack cluster's CI run: `focused` and `dualstack` in one ginkgo run, so that their
# longest specs overlap (test_e2e.py checks that it picks exactly the union of the two).
SELECTIONS["focused+dualstack"] = Selection(
    focus=f"({SELECTIONS['focused'].focus})|({SELECTIONS['dualstack'].focus})",
    skip=SELECTIONS["focused"].skip.replace(r"\[Feature:|", "", 1))


class E2EError(RuntimeError):
    """The suite could not be built or run (not: a spec failed)."""


def build() -> Path:
    """e2e.test, ginkgo and agnhost (cached; a no-op when current)."""
    proc = subprocess.run(["bash", str(HERE / "build-e2e.sh")], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise E2EError(f"build-e2e.sh failed:\n{proc.stderr[-3000:]}")
    return BIN


AGNHOST_DOCKERFILE = """FROM {base}
COPY agnhost localhost.crt localhost.key regression-issue-74839 /
RUN set -eu; chmod 755 /agnhost /regression-issue-74839; chmod 644 /localhost.crt /localhost.key; mkdir -p /uploads; \\
    groupadd -g 50000 agnhost; useradd -u 1000 -g 50000 -M -s /bin/sh agnhost
ENTRYPOINT ["/agnhost"]
CMD ["pause"]
"""


def _docker(daemon: Daemon, *args: str) -> str:
    proc = subprocess.run(["docker", *args], env={**daemon.env, "DOCKER_BUILDKIT": "0"}, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise E2EError(f"docker {' '.join(args[:3])}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def manifest_images(manifest: Path = MANIFEST) -> set[str]:
    """Every `registry/name:tag` the suite's image manifest names (default registries)."""
    text = manifest.read_text()
    registries = dict(re.findall(r'(\w+Registry):\s+"([^"]+)"', text))
    found = set()
    for registry, name, tag in re.findall(r'Config\{list\.(\w+), "([^"]+)", "([^"]+)"\}', text):
        if registry in registries:
            found.add(f"{registries[registry]}/{name}:{tag}")
    return found


def spec_images(daemon: Daemon) -> list[str]:
    """The images the selected specs run, under the names the suite uses (rebuilt when a
    part changed): agnhost, busybox, nginx, the pause binary, and the #74839 server."""
    build()
    wanted = [AGNHOST, BUSYBOX, NGINX, REGRESSION_74839, PAUSE]
    unknown = sorted(set(wanted) - manifest_images())
    if unknown:
        raise E2EError(f"{MANIFEST} no longer names {', '.join(unknown)}: update tests/kind/e2e.py")
    base = images.import_rootfs(daemon, rootfs.AGNHOST, "pyproxy.local/agnhost-base:bookworm")
    derived = ((BUSYBOX, ('ENTRYPOINT []', 'CMD ["sh"]')),
               (NGINX, ('ENTRYPOINT ["/agnhost"]', 'CMD ["netexec", "--http-port=80"]')),
               (REGRESSION_74839, ('ENTRYPOINT ["/regression-issue-74839"]', 'CMD []')))
    key = images._digest(BIN / "agnhost", BIN / "localhost.crt", BIN / "regression-issue-74839",
                         extra=rootfs.AGNHOST.key + AGNHOST_DOCKERFILE + repr(derived))
    if not images._fresh(daemon, AGNHOST, key):
        with tempfile.TemporaryDirectory(prefix="pyproxy-agnhost.") as tmp:
            for name in ("agnhost", "localhost.crt", "localhost.key", "regression-issue-74839"):
                shutil.copy2(BIN / name, Path(tmp) / name)
            (Path(tmp) / "Dockerfile").write_text(AGNHOST_DOCKERFILE.format(base=base))
            _docker(daemon, "build", "--network=none", "-q", "--label", f"{images.KEY_LABEL}={key}", "-t", AGNHOST, tmp)
    # busybox: only `sh -c ...` runs in it; nginx: its pods need to run and answer on :80;
    # regression-issue-74839: its own binary (carried in the agnhost image) as entrypoint
    for name, change in derived:
        if images._label(daemon, name, images.KEY_LABEL) != key:
            context = f"FROM {AGNHOST}\n{change[0]}\n{change[1]}\nLABEL {images.KEY_LABEL}={key}\n"
            proc = subprocess.run(["docker", "build", "--network=none", "-q", "-t", name, "-"], input=context,
                                  env={**daemon.env, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0:
                raise E2EError(f"{name}: {proc.stderr[-2000:]}")
    # the pause image: the nodes' sandbox image (already in them), a pod's container in some specs
    _docker(daemon, "tag", images.PAUSE_IMAGE, PAUSE)
    return wanted


@dataclass
class Result:
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # spec -> first lines of its failure
    skipped: dict[str, str] = field(default_factory=dict)  # spec -> why
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"e2e: {len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped "
                f"in {self.seconds:.0f} s")


def read_junit(path: Path) -> Result:
    """The specs of a ginkgo junit report that ran (suite setup nodes are not specs and are
    left out, unless they failed: then the whole run failed, and that is a failure)."""
    result = Result()
    root = ET.parse(path).getroot()
    result.seconds = float(root.get("time") or 0)
    for case in root.iter("testcase"):
        name = case.get("name") or ""
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        is_spec = name.startswith("[It]")
        if failure is not None:
            text = (failure.get("message") or "") + "\n" + (failure.text or "")
            result.failed[name] = "\n".join(text.strip().splitlines()[:12])
        elif not is_spec:
            continue
        elif skipped is not None or case.get("status") == "skipped":
            # "skipped": left out by the focus, not part of the run; "skipped - why": the
            # spec ran and skipped itself (a missing feature, too few nodes...)
            reason = "" if skipped is None else (skipped.get("message") or "")
            if reason.startswith("skipped - "):
                result.skipped[name] = reason[len("skipped - "):].strip()[:300]
        else:
            result.passed.append(name)
    return result


ZONE_LABEL = "topology.kubernetes.io/zone"
CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane"


def zones(workers: list[str]) -> dict[str, str]:
    """A zone per worker, dealt round the sorted workers into three zones (six workers:
    three zones of two, what the multi-node Traffic Distribution specs ask for)."""
    return {name: f"zone-{'abc'[i % 3]}" for i, name in enumerate(sorted(workers))}


def prepare(c: cluster.Cluster, daemon: Daemon) -> None:
    """Load the spec images and lay the nodes out for the specs.

    Two nodes: the control plane's taint is removed, so that specs wanting two schedulable
    nodes run; no zones (the topology specs then skip: one node cannot make two zones).
    More nodes: the control plane keeps its taint and the workers get zones. The
    EndpointSlice controller leaves control-plane nodes out of its zone shares, so an
    untainted control plane would carry endpoints that no zone's share accounts for, and
    Topology Hints' even distribution could never hold."""
    cluster.load(daemon, *spec_images(daemon))
    names = [n.name for n in c.nodes()]
    if len(names) <= 2:
        c.kubectl("taint", "nodes", "--all", f"{CONTROL_PLANE_TAINT}-", check=False)
        return
    for name, zone in zones([n for n in names if n != f"{cluster.NAME}-control-plane"]).items():
        c.kubectl("label", "node", name, "--overwrite", f"{ZONE_LABEL}={zone}")


def run(c: cluster.Cluster, daemon: Daemon, selection: Selection, out: Path, timeout_s: int = 3600) -> Result:
    """Run `selection` against the cluster; junit and logs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    argv = daemon.netns_cmd(
        str(BIN / "ginkgo"), f"--procs={selection.procs}", "--timeout=2h", f"--focus={selection.focus}",
        f"--skip={selection.skip}", "--junit-report=junit.xml", f"--output-dir={out}", "--no-color",
        str(BIN / "e2e.test"), "--",
        "--provider=skeleton", f"--kubeconfig={cluster.KUBECONFIG}", f"--kubectl-path={images.BIN / 'kubectl'}",
        "--num-nodes=2", f"--report-dir={out}", "--disable-log-dump=true",
    )
    with open(out / "ginkgo.log", "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=out)
    junit = out / "junit.xml"
    if not junit.exists():
        tail = (out / "ginkgo.log").read_text(errors="replace")[-3000:]
        raise E2EError(f"ginkgo exited {proc.returncode} with no junit report:\n{tail}")
    return read_junit(junit)


def list_specs(selection: Selection) -> list[str]:
    """The spec names `selection` picks, read offline from e2e.test."""
    build()
    out = subprocess.run([str(BIN / "ginkgo"), "--dry-run", "-v", f"--focus={selection.focus}",
                          f"--skip={selection.skip}", "--no-color", str(BIN / "e2e.test"), "--",
                          "--provider=skeleton"], capture_output=True, text=True, timeout=300)
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("[sig-")]
