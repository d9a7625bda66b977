"""Every container image the kind tier runs, built locally from cached parts.

Rules it keeps:
- Images have names under `pyproxy.local/` (a registry that does not exist), so nothing is
  ever mistaken for, or fetched as, an upstream image. kubeadm is pointed at them with
  `imageRepository` (see cluster.py); the versions are the built ones (`versions()`).
- Control-plane images (kube-apiserver, -controller-manager, -scheduler, etcd, CoreDNS,
  pause) are one static binary each, imported from a tar stream made here.
- The node image is assembled by hand, as `kind build node-image` would, but offline: kind's
  base files from its pinned module, a debootstrapped Debian, containerd/crictl/kubelet/kubeadm/
  kubectl built from source, and the control-plane images pre-imported into the node's
  containerd (kind's own builder insists on pulling kindnetd, which cannot be built here).
- pyproxy's image is built from the repository's Dockerfile with `--network=none`, its builder
  stage on a local Python base with gcc and python3-dev, its runtime stage on the local Python
  base (no compiler), and a wheelhouse made on the host: the same recipe users build online.
- An image whose inputs (a content key) have not changed is not rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.kind import rootfs
from tests.kind.dockerd import Daemon

CACHE = Path(os.environ.get("PYPROXY_CACHE", "/var/cache/pyproxy"))
BIN = CACHE / "bin"
REPO = Path(__file__).resolve().parents[2]
REGISTRY = "pyproxy.local/k8s"
KIND_MODULE = CACHE / "gomod" / "sigs.k8s.io" / "kind@v0.33.0"

K8S_VERSION = "v1.37.2"
ETCD_TAG = "3.7.3-0"
COREDNS_TAG = "v1.14.6"
PAUSE_TAG = "3.10.2"

NODE_IMAGE = f"pyproxy.local/kind-node:{K8S_VERSION}"
PYTHON_BASE = "pyproxy.local/python-base:bookworm"
BUILDER_BASE = "pyproxy.local/python-build:bookworm"  # PYTHON_BASE's Python with gcc and its headers
PYPROXY_IMAGE = "pyproxy:dev"  # the name daemonset.yaml runs


@dataclass(frozen=True)
class Component:
    """A control-plane image made of one static binary."""

    name: str
    tag: str
    binary: str
    path: str  # where the binary sits in the image

    @property
    def image(self) -> str:
        return f"{REGISTRY}/{self.name}:{self.tag}"


COMPONENTS = (
    Component("kube-apiserver", K8S_VERSION, "kube-apiserver", "/usr/local/bin/kube-apiserver"),
    Component("kube-controller-manager", K8S_VERSION, "kube-controller-manager", "/usr/local/bin/kube-controller-manager"),
    Component("kube-scheduler", K8S_VERSION, "kube-scheduler", "/usr/local/bin/kube-scheduler"),
    Component("etcd", ETCD_TAG, "etcd", "/usr/local/bin/etcd"),
    Component("coredns", COREDNS_TAG, "coredns", "/coredns"),
    Component("pause", PAUSE_TAG, "pause", "/pause"),
)
PAUSE_IMAGE = COMPONENTS[-1].image  # the nodes' sandbox image


class BuildError(RuntimeError):
    """An image could not be built."""


def _docker(daemon: Daemon, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["docker", *args], env=daemon.env, input=stdin, capture_output=True, timeout=1800,
    )
    if check and proc.returncode != 0:
        raise BuildError(f"docker {' '.join(args[:3])}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace").strip()


def _label(daemon: Daemon, image: str, key: str) -> str | None:
    out = _docker(daemon, "image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
    try:
        labels = json.loads(out) if out else None
    except json.JSONDecodeError:
        return None
    return labels.get(key) if isinstance(labels, dict) else None


def _digest(*paths: Path, extra: str = "") -> str:
    """A content key: small files (sources) by their bytes, big ones (built binaries in the
    cache, rewritten only when rebuilt) by size and modification time."""
    h = hashlib.sha256(extra.encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            st = f.stat()
            h.update(f.read_bytes() if st.st_size < 1 << 20 else f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


KEY_LABEL = "pyproxy.kind.key"


def _fresh(daemon: Daemon, image: str, key: str) -> bool:
    return _label(daemon, image, KEY_LABEL) == key


def _binary_tar(component: Component) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/false\n"), ("etc/group", "root:x:0:\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
        tar.add(BIN / component.binary, arcname=component.path.lstrip("/"))
    return buf.getvalue()


def component_images(daemon: Daemon) -> list[str]:
    """Import each control-plane image (if its binary changed) and return their names."""
    for c in COMPONENTS:
        key = _digest(BIN / c.binary, extra=c.path)
        if _fresh(daemon, c.image, key):
            continue
        _docker(
            daemon, "import",
            "--change", f'ENTRYPOINT ["{c.path}"]',
            "--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin",
            "--change", f"LABEL {KEY_LABEL}={key}",
            "-", c.image, stdin=_binary_tar(c),
        )
    return [c.image for c in COMPONENTS]


def import_rootfs(daemon: Daemon, role: rootfs.Role, image: str, *changes: str) -> str:
    """`docker import` a debootstrapped root file system (built if needed) as `image`."""
    tar = rootfs.build(role)
    if _fresh(daemon, image, role.key):
        return image
    args = ["import"]
    for change in (*changes, f"LABEL {KEY_LABEL}={role.key}"):
        args += ["--change", change]
    _docker(daemon, *args, str(tar), image)
    return image


# /proc/sys files that something in a kind node would write although they are global to the
# machine: systemd (PID 1) raises fs.file-max and fs.nr_open, the kubelet sets vm.* and kernel.*
# to its defaults. The node's entrypoint bind-mounts a private copy over each before anything
# runs, so those writes land in the copy.
SHIELDED_SYSCTLS = (
    "fs/file-max", "fs/nr_open", "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
    "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
)

NODE_ENTRYPOINT = """#!/bin/bash
# pyproxy's kind node entrypoint: shield the machine's global sysctls (see tests/kind/images.py),
# then hand over to kind's own entrypoint, which execs systemd.
set -eu
mkdir -p /run/pyproxy-sysctl-shield
for key in {keys}; do
    copy="/run/pyproxy-sysctl-shield/${{key//\\//_}}"
    cat "/proc/sys/$key" > "$copy"
    mount --bind "$copy" "/proc/sys/$key"
done
exec /usr/local/bin/entrypoint "$@"
"""

NODE_DOCKERFILE = """FROM {base}
COPY files/ /
COPY bin/ /usr/local/bin/
COPY k8s/ /usr/bin/
RUN set -eux; \\
    chmod 755 /kind /kind/bin /kind/bin/* /usr/local/bin/*; \\
    mkdir -p /opt/cni/bin /etc/kubernetes/manifests; \\
    for p in /usr/lib/cni/*; do ln -sf "$p" /opt/cni/bin/; done; \\
    find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete; \\
    rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/*; \\
    echo ReadKMsg=no >> /etc/systemd/journald.conf; \\
    ln -sf /usr/lib/systemd/systemd /sbin/init; \\
    systemctl enable kubelet.service containerd.service undo-mount-hacks.service; \\
    systemctl mask systemd-binfmt.service; \\
    ctr oci spec \\
      | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {{"path": "/kind/bin/mount-product-files.sh"}}' \\
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json; \\
    sed -i -e 's|^\\( *sandbox_image = \\).*|\\1"{pause}"|' \\
           -e 's|^\\( *restrict_oom_score_adj = \\).*|\\1true|' /etc/containerd/config.toml; \\
    grep -q '{pause}' /etc/containerd/config.toml; \\
    echo '{version}' > /kind/version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/pyproxy-node-entrypoint", "/sbin/init"]
"""


def _node_context(ctx: Path, base: str) -> None:
    """Lay out the node image's build context in ctx."""
    shutil.copytree(KIND_MODULE / "images" / "base" / "files", ctx / "files", dirs_exist_ok=True)
    for d in (ctx / "files").rglob("*"):
        d.chmod(0o755 if d.is_dir() or d.suffix == ".sh" or d.parent.name == "bin" else 0o644)
    entry = ctx / "bin" / "pyproxy-node-entrypoint"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(NODE_ENTRYPOINT.format(keys=" ".join(SHIELDED_SYSCTLS)))
    for name in ("containerd", "ctr", "containerd-shim-runc-v2", "crictl"):
        shutil.copy2(BIN / name, ctx / "bin" / name)
    (ctx / "k8s").mkdir()
    for name in ("kubeadm", "kubelet", "kubectl"):
        shutil.copy2(BIN / name, ctx / "k8s" / name)
    (ctx / "Dockerfile").write_text(NODE_DOCKERFILE.format(base=base, pause=PAUSE_IMAGE, version=K8S_VERSION))


def _preload(daemon: Daemon, image: str, images: list[str], key: str) -> None:
    """Import `images` into the node image's containerd (k8s.io namespace) and commit."""
    box = _docker(daemon, "run", "-d", "--entrypoint=sleep", "--security-opt", "seccomp=unconfined", image, "infinity")
    try:
        _docker(daemon, "exec", box, "bash", "-c", "nohup containerd >/dev/null 2>&1 &")
        _docker(daemon, "exec", box, "bash", "-c",
                "for i in $(seq 50); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1")
        saved = subprocess.run(["docker", "save", *images], env=daemon.env, capture_output=True, check=True, timeout=600).stdout
        _docker(daemon, "exec", "-i", box, "ctr", "--namespace=k8s.io", "images", "import",
                "--label=io.cri-containerd.pinned=pinned", "--all-platforms", "--no-unpack", "--digests", "-",
                stdin=saved)
        listed = _docker(daemon, "exec", box, "ctr", "--namespace=k8s.io", "images", "list", "-q")
        missing = [i for i in images if i not in listed.split()]
        if missing:
            raise BuildError(f"node image: {missing} not in the node's containerd after import")
        _docker(daemon, "exec", box, "pkill", "containerd")
        _docker(daemon, "commit",
                "--change", 'ENTRYPOINT ["/usr/local/bin/pyproxy-node-entrypoint", "/sbin/init"]',
                "--change", "CMD []",
                "--change", f"LABEL {KEY_LABEL}={key}", box, image)
    finally:
        _docker(daemon, "rm", "-f", "-v", box, check=False)


def node_image(daemon: Daemon) -> str:
    """kind's node image for K8S_VERSION, with the control-plane images inside."""
    images = component_images(daemon)
    base = import_rootfs(daemon, rootfs.NODE, "pyproxy.local/kind-base:bookworm")
    parts = [BIN / n for n in ("containerd", "ctr", "containerd-shim-runc-v2", "crictl", "kubeadm", "kubelet", "kubectl")]
    key = _digest(*parts, Path(__file__), KIND_MODULE / "images" / "base" / "files", extra=rootfs.NODE.key + " ".join(
        f"{c.image}={_digest(BIN / c.binary)}" for c in COMPONENTS))
    if _fresh(daemon, NODE_IMAGE, key):
        return NODE_IMAGE
    with tempfile.TemporaryDirectory(prefix="pyproxy-node.") as tmp:
        _node_context(Path(tmp), base)
        proc = subprocess.run(
            ["docker", "build", "--network=none", "-q", "-t", NODE_IMAGE, tmp],
            env={**daemon.env, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=1800,
        )
        if proc.returncode != 0:
            raise BuildError(f"node image build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _preload(daemon, NODE_IMAGE, images, key)
    return NODE_IMAGE


# The files of the repository that go into pyproxy's image (the Dockerfile COPYs `.` into its
# builder stage; .dockerignore keeps the rest out of an online build's context too). Libraries
# built in the tree (`pyproxy/dataplane/_engine*.so`) stay out: the builder stage compiles the
# engine from engine.c for the image's own Python.
IMAGE_SOURCES = ("Dockerfile", ".dockerignore", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md",
                 "pyproxy", "bench")


def wheelhouse(python: str) -> Path:
    """pyproxy's dependencies (and its build backend) as wheels, for an offline image build."""
    out = CACHE / "kind" / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(out), str(REPO)], check=True, timeout=900)
    subprocess.run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "-d", str(out), "setuptools>=77", "wheel"], check=True, timeout=900)
    for stale in out.glob("pyproxy-*.whl"):
        stale.unlink()  # pyproxy itself is installed from the copied sources
    return out


def pyproxy_image(daemon: Daemon, python: str) -> str:
    """Build `pyproxy:dev` from the Dockerfile, offline: its builder stage on the local Python
    base with gcc and python3-dev (rootfs.BUILDER), its runtime stage on the local Python base;
    the Dockerfile fails the build unless the engine it compiled loads in the runtime stage."""
    base = import_rootfs(daemon, rootfs.PYTHON, PYTHON_BASE)
    builder = import_rootfs(daemon, rootfs.BUILDER, BUILDER_BASE)
    with tempfile.TemporaryDirectory(prefix="pyproxy-image.") as tmp:
        ctx = Path(tmp)
        for name in IMAGE_SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.egg-info", "out", "*.so", "*.tmp"))
            elif src.exists():
                shutil.copy2(src, ctx / name)
        shutil.copytree(wheelhouse(python), ctx / "wheels")
        proc = subprocess.run(
            ["docker", "build", "--network=none", "-q", "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", f"BUILDER_IMAGE={builder}", "-t", PYPROXY_IMAGE, str(ctx)],
            env={**daemon.env, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=1800,
        )
        if proc.returncode != 0:
            raise BuildError(f"pyproxy image build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return PYPROXY_IMAGE
