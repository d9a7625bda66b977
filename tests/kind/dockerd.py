"""A docker daemon of the kind tier's own, in a network namespace with no route out.

Rules it keeps (../shared/KIND.md):
- dockerd runs inside the network namespace `NETNS` (only `lo`, no route anywhere), entered
  with `nsenter --net` only, so /sys and the cgroup hierarchies stay as they are. Docker's
  bridges, iptables rules and port proxies all live there; the root namespace's network and
  the machine's sysctls are never touched, and no container can reach an outside address.
- It listens only on a unix socket of its own (`SOCKET`); clients set DOCKER_HOST. Images and
  layers live in the cache (`/var/cache/pyproxy/docker`), so a warm start needs no build.
- Its default runtime is `runc_wrapper.py`, which drops the capabilities this machine's root
  lacks from every container spec (otherwise privileged containers, i.e. kind nodes, fail).
- `stop()` ends only the dockerd this module started (by the PID in its pid file), waits for it,
  and deletes the namespace. Starting twice reuses a daemon that still answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("PYPROXY_CACHE", "/var/cache/pyproxy"))
NETNS = "pyproxy-kind"
RUN = Path("/run/pyproxy-kind")
SOCKET = RUN / "docker.sock"
PIDFILE = RUN / "docker.pid"
DOCKER = "/usr/bin/docker"  # Debian's client, the daemon's own version
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


_STARTED: list[subprocess.Popen[bytes]] = []


class DockerError(RuntimeError):
    """dockerd could not be started or stopped."""


@dataclass(frozen=True)
class Daemon:
    socket: Path
    netns: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for docker/kind clients talking to this daemon."""
        env = dict(os.environ)
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["PATH"] = f"{tools_path()}:{env.get('PATH', '')}"
        return env

    def netns_cmd(self, *argv: str) -> list[str]:
        """argv run inside the daemon's network namespace (where kind's nodes are reachable)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]


def tools_path() -> Path:
    """A PATH entry where `docker` is the daemon's own client and kind/kubectl are the built ones."""
    path = RUN / "bin"
    path.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("docker", Path(DOCKER)),
        ("kind", CACHE / "bin" / "kind"),
        ("kubectl", CACHE / "bin" / "kubectl"),
    ):
        link = path / name
        if not link.is_symlink() or os.readlink(link) != str(target):
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return path


def _answers(daemon: Daemon) -> bool:
    probe = subprocess.run(
        [DOCKER, "version", "--format", "{{.Server.Version}}"],
        env=daemon.env, capture_output=True, text=True, timeout=20,
    )
    return probe.returncode == 0


def _ensure_netns() -> None:
    if not Path(f"/run/netns/{NETNS}").exists():
        subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)


def _daemon_argv() -> list[str]:
    wrapper = Path(__file__).with_name("runc_wrapper.py")
    return [
        "nsenter", f"--net=/run/netns/{NETNS}", "--",
        "dockerd",
        f"--host=unix://{SOCKET}",
        f"--pidfile={PIDFILE}",
        f"--exec-root={RUN / 'exec'}",
        f"--data-root={CACHE / 'docker'}",
        "--storage-driver=overlay2",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        f"--add-runtime=pyproxy-runc={wrapper}",
        "--default-runtime=pyproxy-runc",
        "--log-level=warn",
    ]


def start() -> Daemon:
    """Start (or reuse) the kind tier's dockerd; returns once it answers."""
    daemon = Daemon(SOCKET, NETNS)
    RUN.mkdir(parents=True, exist_ok=True)
    if SOCKET.exists() and _answers(daemon):
        return daemon
    _ensure_netns()
    (CACHE / "docker").mkdir(parents=True, exist_ok=True)
    with open(RUN / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(_daemon_argv(), stdout=log, stderr=log, start_new_session=True)
    _STARTED.append(proc)  # it outlives this call on purpose; stop() reaps it
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DockerError(f"dockerd exited with {proc.returncode}; see {RUN / 'dockerd.log'}")
        if SOCKET.exists() and _answers(daemon):
            return daemon
        time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=STOP_TIMEOUT_S)
    raise DockerError(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s; see {RUN / 'dockerd.log'}")


def _pid() -> int | None:
    try:
        return int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


def stop() -> None:
    """Stop the daemon this module started and delete its namespace."""
    pid = _pid()
    if pid is not None and _is_dockerd(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _is_dockerd(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_dockerd(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in _STARTED:
        proc.poll()
    _STARTED[:] = [p for p in _STARTED if p.returncode is None]
    if Path(f"/run/netns/{NETNS}").exists():
        subprocess.run(["ip", "netns", "delete", NETNS], check=False)
    shutil.rmtree(RUN / "bin", ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["stop"]:
        stop()
    else:
        print(start().socket)
