"""Debian root file systems for the kind tier's images, made with debootstrap, cached.

Rules it keeps:
- Nothing can be pulled from a container registry here, so every base image starts as a
  `debootstrap --variant=minbase` of Debian bookworm from the Debian mirror apt is already
  configured with (read from /etc/apt; no host is named in this code), plus the packages
  each role needs (`ROLES`). The result is a tarball in the cache, keyed by the role's package
  list, so a changed list rebuilds and an unchanged one is never rebuilt.
- Files that would make systemd write the machine's global sysctls (/usr/lib/sysctl.d) are
  removed, as are apt's caches and lists (the images are never apt-updated).
- A failed build leaves no half-made tarball and no temporary tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("PYPROXY_CACHE", "/var/cache/pyproxy"))
SUITE = "bookworm"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Role:
    name: str
    packages: tuple[str, ...]

    @property
    def key(self) -> str:
        text = f"{SUITE} {' '.join(sorted(self.packages))}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# A kind node: what kind's own base image installs, plus the runc and CNI plugins that kind
# would otherwise download (Debian's builds here).
NODE = Role("node", (
    "systemd", "dbus", "conntrack", "iptables", "nftables", "iproute2", "ethtool", "util-linux",
    "mount", "kmod", "libseccomp2", "pigz", "e2fsprogs", "bash", "ca-certificates", "curl",
    "jq", "procps", "socat", "runc", "containernetworking-plugins",
))
# pyproxy's offline image base (the public one is python:3.11-slim): Debian's Python 3.11
# with venv, nft and ip; curl and dig so that the same image serves as the tier's test pod.
PYTHON = Role("python", (
    "python3", "python3-venv", "nftables", "iproute2", "ca-certificates", "curl", "dnsutils",
    "procps",
))
# The Dockerfile's builder stage, offline (the public one is the same slim Python image plus gcc):
# Debian's Python 3.11 as in PYTHON, with a C compiler and Python's headers to build the
# engine's wheel. Only the builder uses it: the runtime image stays without a compiler.
BUILDER = Role("python-build", (
    "python3", "python3-venv", "python3-dev", "gcc", "libc6-dev",
))


# The e2e suite's agnhost image (tests/kind/e2e.py): the tools its specs exec in it.
AGNHOST = Role("agnhost", (
    "bash", "curl", "wget", "netcat-openbsd", "iproute2", "dnsutils", "socat", "ca-certificates",
    "procps", "iputils-ping", "passwd",
))


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror URI apt is configured with (deb822 or one-line sources)."""
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")) + [apt_dir / "sources.list"]:
        if not path.is_file():
            continue
        text = path.read_text()
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in match.group(1):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in match.group(1):
                return match.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt (debootstrap needs one)")


def tarball(role: Role) -> Path:
    return CACHE / "kind" / f"rootfs-{role.name}-{role.key}.tar"


def build(role: Role) -> Path:
    """The role's root file system as a tarball, built if it is not cached."""
    out = tarball(role)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"rootfs-{role.name}.") as tmp:
        root = Path(tmp) / "root"
        try:
            _debootstrap(role, root)
        finally:
            _unmount_below(root)  # debootstrap mounts /proc and /sys inside; never rmtree those
        partial = out.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        os.replace(partial, out)
    return out


def _unmount_below(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def _debootstrap(role: Role, root: Path) -> None:
    subprocess.run(
        [
            "debootstrap", "--variant=minbase", f"--keyring={KEYRING}",
            f"--include={','.join(role.packages)}", SUITE, str(root), debian_mirror(),
        ],
        check=True, stdout=subprocess.DEVNULL,
    )
    for junk in ("usr/lib/sysctl.d", "var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(root / junk, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
