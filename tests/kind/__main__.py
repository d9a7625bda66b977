"""`cmd/kind`: an offline kind cluster with pyproxy as its Service proxy.

    cmd/kind up [--cni routed|bridge] [--no-pyproxy]   build what is missing, make the cluster,
                                                       load pyproxy:dev, apply daemonset.yaml
    cmd/kind load                                      rebuild pyproxy:dev and load it
    cmd/kind kubectl ARGS...                           kubectl against the cluster
    cmd/kind demo                                      the scenarios, walked through in the cluster
    cmd/kind e2e [--select focused|broad|dualstack] [--focus RE] [--skip RE] [--cni C] [--out DIR]
                                                       Kubernetes' e2e suite against the cluster
                                                       (brought up first if none is running)
    cmd/kind down                                      delete the cluster, stop the docker daemon

Everything is built from source into /var/cache/pyproxy the first time (about 30 min on 2
cores: Kubernetes, etcd, containerd, CoreDNS, kind; Debian bases with debootstrap); later runs
reuse it. docker runs in a network namespace of its own with no route out (tests/kind/dockerd.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.kind import cluster, dockerd, e2e, images

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def log(msg: str) -> None:
    print(f"[kind] {msg}", file=sys.stderr, flush=True)


def build_binaries() -> None:
    """The Go builds (cached; a no-op when current)."""
    for script in (REPO / "tests/realapi/build-binaries.sh", HERE / "build-tools.sh"):
        subprocess.run(["bash", str(script)], check=True, stdout=subprocess.DEVNULL)


def build_images(daemon: dockerd.Daemon) -> None:
    build_binaries()
    log("node image (cached when its parts are unchanged)")
    images.node_image(daemon)
    log("pyproxy image from the Dockerfile, offline")
    images.pyproxy_image(daemon, sys.executable)


def apply_pyproxy(c: cluster.Cluster, timeout_s: int = 180) -> None:
    """What the README tells a user: kubectl apply -f daemonset.yaml, then wait for it."""
    c.kubectl("apply", "-f", str(REPO / "daemonset.yaml"))
    c.kubectl("-n", "kube-system", "rollout", "status", "daemonset/pyproxy", f"--timeout={timeout_s}s",
              timeout=timeout_s + 10)
    c.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", f"--timeout={timeout_s}s",
              timeout=timeout_s + 10)


def up(cni: str, with_pyproxy: bool, workers: int = 1) -> cluster.Cluster:
    start = time.monotonic()
    daemon = dockerd.start()
    build_images(daemon)
    log(f"cluster {cluster.NAME!r} on the {cni} pod network, {workers + 1} nodes")
    c = cluster.create(daemon, cni, workers)
    cluster.load(daemon, images.PYPROXY_IMAGE)
    if with_pyproxy:
        log("kubectl apply -f daemonset.yaml")
        apply_pyproxy(c)
    log(f"up in {time.monotonic() - start:.0f}s; `cmd/kind kubectl get pods -A` to look")
    return c


def current() -> cluster.Cluster:
    daemon = dockerd.start()
    cni = (dockerd.RUN / "cni").read_text().strip() if (dockerd.RUN / "cni").exists() else "routed"
    return cluster.Cluster(daemon, cni)


def kubectl(args: Sequence[str]) -> int:
    daemon = dockerd.start()
    argv = daemon.netns_cmd(str(images.BIN / "kubectl"), f"--kubeconfig={cluster.KUBECONFIG}", *args)
    return subprocess.run(argv).returncode


def run_e2e(select: str, focus: str | None, skip: str | None, cni: str | None, out: Path,
            workers: int | None = None) -> int:
    """The e2e specs against the running cluster (or one brought up on `cni`, default routed,
    with `workers`, default 1): junit in `out`, a one-line summary, and each failed spec with
    the start of its reason. A running cluster of another shape than asked for is an error."""
    daemon = dockerd.start()
    if cluster.exists(daemon):
        c = current()
        nodes = len(c.nodes()) if workers is not None else 0
        if (cni is not None and cni != c.cni) or (workers is not None and workers + 1 != nodes):
            shape = f"--cni {c.cni}" + (f" --workers {nodes - 1}" if workers is not None else "")
            raise SystemExit(f"cmd/kind e2e: a cluster runs already ({shape}), not the one asked for; "
                             "`cmd/kind down` first, or leave out --cni/--workers to use it")
    else:
        cni, workers = cni or "routed", workers or 1
        c = up(cni, with_pyproxy=True, workers=workers)
        (dockerd.RUN / "cni").write_text(cni)
    chosen = e2e.SELECTIONS[select]
    selection = e2e.Selection(focus or chosen.focus, skip if skip is not None else chosen.skip, chosen.procs)
    log(f"e2e {select} on the {c.cni} pod network: images, then ginkgo (junit in {out})")
    e2e.prepare(c, daemon)
    result = e2e.run(c, daemon, selection, out)
    for spec, why in result.failed.items():
        log(f"FAILED {spec}\n    " + why.replace("\n", "\n    "))
    log(result.summary())
    return 1 if result.failed or not result.passed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmd/kind", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="make the cluster, with pyproxy in it")
    p_up.add_argument("--cni", choices=cluster.CNIS, default="routed", help="pod network (default: routed)")
    p_up.add_argument("--no-pyproxy", action="store_true", help="stop before applying daemonset.yaml")
    p_up.add_argument("--workers", type=int, default=1,
                      help=f"worker nodes beside the control plane (default 1, at most {cluster.MAX_WORKERS})")
    sub.add_parser("load", help="rebuild pyproxy:dev and load it into the nodes")
    p_kubectl = sub.add_parser("kubectl", help="kubectl against the cluster")
    p_kubectl.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("demo", help="walk through the scenarios in the cluster")
    p_e2e = sub.add_parser("e2e", help="run Kubernetes' own e2e specs against the cluster")
    p_e2e.add_argument("--select", choices=sorted(e2e.SELECTIONS), default="focused",
                       help="a named set of specs (default: focused, the CI set)")
    p_e2e.add_argument("--focus", help="a ginkgo focus regex instead of the set's")
    p_e2e.add_argument("--skip", help="a ginkgo skip regex instead of the set's")
    p_e2e.add_argument("--cni", choices=cluster.CNIS,
                       help="pod network of a cluster brought up for the run (default: routed; "
                            "with a cluster running, it must be that one's)")
    p_e2e.add_argument("--workers", type=int,
                       help="worker nodes of a cluster brought up for the run (default 1; 6 for the zone "
                            "specs; with a cluster running, it must have that many)")
    p_e2e.add_argument("--out", type=Path, default=Path("/tmp/pyproxy-e2e"), help="junit and logs (default: %(default)s)")
    sub.add_parser("down", help="delete the cluster and stop the docker daemon")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kubectl"]:  # everything after it is kubectl's, flags included
        return kubectl(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "up":
        up(args.cni, not args.no_pyproxy, args.workers)
        (dockerd.RUN / "cni").write_text(args.cni)
    elif args.command == "load":
        daemon = dockerd.start()
        images.pyproxy_image(daemon, sys.executable)
        cluster.load(daemon, images.PYPROXY_IMAGE)
    elif args.command == "demo":
        from tests.kind import demo
        return demo.main(current())
    elif args.command == "e2e":
        return run_e2e(args.select, args.focus, args.skip, args.cni, args.out, args.workers)
    elif args.command == "down":
        if Path(f"/run/netns/{dockerd.NETNS}").exists() and dockerd.SOCKET.exists():
            cluster.delete(dockerd.start())
        dockerd.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (cluster.ClusterError, images.BuildError, dockerd.DockerError, e2e.E2EError,
            subprocess.CalledProcessError) as exc:
        log(f"failed: {exc}")
        sys.exit(1)
