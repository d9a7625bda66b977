"""A real etcd + kube-apiserver on loopback, for the realapi test tier.

`KubeAPIServer` starts one etcd and one kube-apiserver as child processes,
bound to free ports on 127.0.0.1, with everything they need (a throwaway CA and
serving certificate, a service-account key pair, a static admin token, a
kubeconfig) in a private work directory. It keeps only:

* the PIDs of the two processes it started (stopped by PID: SIGTERM, then
  SIGKILL after a bound; nothing else is ever signalled),
* their log files (the tail is put into the error when startup fails),
* the work directory (removed on stop).

No fakes: the binaries come from `build-binaries.sh` (see `build_binaries`).
`compact_etcd()` compacts etcd through its v3 HTTP/JSON gateway so tests can
make old resourceVersions expire (watch -> 410 Gone).
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-binaries.sh"
LOOPBACK = "127.0.0.1"
ADMIN_USER = "pyproxy-admin"
ADMIN_GROUP = "system:masters"
LOG_TAIL_LINES = 40


class KubeStartError(RuntimeError):
    """etcd or kube-apiserver did not become ready."""


@dataclass(frozen=True)
class KubeOptions:
    """Knobs for the test control plane."""

    service_cidr: str = "10.96.0.0/16"
    node_port_range: str = "30000-32767"
    authorization_mode: str = "RBAC"
    ready_timeout: float = 90.0
    stop_timeout: float = 15.0
    # False makes every watch go straight to etcd, so a compaction turns an
    # old resourceVersion into 410 Gone at once (the watch cache may keep
    # serving it otherwise).
    watch_cache: bool = True
    etcd_auto_compaction_retention: str | None = None  # e.g. "1m" (periodic)
    # More IP addresses for the serving certificate, e.g. where a forwarder makes the
    # API server reachable from a lab's node namespaces.
    extra_ips: Sequence[str] = field(default_factory=tuple)
    extra_apiserver_args: Sequence[str] = field(default_factory=tuple)
    extra_etcd_args: Sequence[str] = field(default_factory=tuple)


def build_binaries(timeout: float = 3 * 3600) -> Path:
    """Run build-binaries.sh (a no-op when cached) and return the bin dir."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{_tail(proc.stderr)}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{BUILD_SCRIPT} printed no bin dir")
    return Path(lines[-1])


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved before fork: the child only calls it.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if the process that started it dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, check=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {sans}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    sa_private_key: Path
    sa_public_key: Path


def make_pki(directory: Path, extra_ips: Sequence[str] = ()) -> Pki:
    """A throwaway CA, a serving cert for 127.0.0.1 (+ extra_ips) and a service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    sans = ",".join([f"IP:{LOOPBACK}", *(f"IP:{ip}" for ip in extra_ips), "DNS:localhost"])
    (directory / "openssl.cnf").write_text(_OPENSSL_CNF.format(sans=sans))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "7", "-config", "openssl.cnf", "-extensions", "v3_ca",
             "-subj", "/CN=pyproxy-realapi-ca", cwd=directory)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-config", "openssl.cnf", "-subj", "/CN=localhost", cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "7",
             "-extfile", "openssl.cnf", "-extensions", "v3_server",
             "-out", "server.crt", cwd=directory)
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", "sa.key", cwd=directory)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    return Pki(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "server.crt",
        serving_key=directory / "server.key",
        sa_private_key=directory / "sa.key",
        sa_public_key=directory / "sa.pub",
    )


def make_client_cert(directory: Path, user: str, group: str) -> tuple[Path, Path]:
    """A client certificate for `user` in `group`, signed by make_pki's CA in `directory`."""
    stem = f"client-{user}"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-new", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
             "-config", "openssl.cnf", "-subj", f"/O={group}/CN={user}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "7",
             "-extfile", "openssl.cnf", "-extensions", "v3_client",
             "-out", f"{stem}.crt", cwd=directory)
    return directory / f"{stem}.crt", directory / f"{stem}.key"


class ManagedProcess:
    """One child process we started, its log file, and how to stop it by PID."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float) -> None:
        """SIGTERM our PID, SIGKILL it after `timeout`, reap it, close the log."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n{_tail_file(self.log_path)}"


def _wait_until(what: str, probe: Any, deadline: float,
                procs: Sequence[ManagedProcess]) -> None:
    """Poll `probe()` until it returns True; fail early if a process died."""
    last_error = "not probed yet"
    while time.monotonic() < deadline:
        for proc in procs:
            code = proc.exit_code()
            if code is not None:
                raise KubeStartError(f"{proc.name} exited with {code} while waiting for {what}")
        try:
            if probe():
                return
            last_error = "probe said not ready"
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise KubeStartError(f"timed out waiting for {what} ({last_error})")


class KubeAPIServer:
    """A real etcd + kube-apiserver on loopback; use as a context manager."""

    def __init__(self, bin_dir: Path | str, tmp_dir: Path | str | None = None,
                 options: KubeOptions | None = None) -> None:
        self.bin_dir = Path(bin_dir)
        self.options = options or KubeOptions()
        self._parent_tmp = Path(tmp_dir) if tmp_dir is not None else None
        self.workdir: Path | None = None
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        self.etcd_client_port = 0
        self.etcd_peer_port = 0
        self.port = 0
        self.pki: Pki | None = None
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None

    # -- public properties -------------------------------------------------

    @property
    def host(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{LOOPBACK}:{self.etcd_client_port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self._work() / "kubeconfig"

    @property
    def ca_cert_path(self) -> Path:
        assert self.pki is not None, "not started"
        return self.pki.ca_cert

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> KubeAPIServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-", dir=self._parent_tmp))
        atexit.register(self.stop)
        try:
            self.pki = make_pki(self._work() / "pki", self.options.extra_ips)
            self._write_token_file()
            self._start_etcd()
            self.port = free_port()
            self._start_apiserver()
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop only the processes started here (by PID) and remove the work dir."""
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop(self.options.stop_timeout)
        self.apiserver = self.etcd = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        atexit.unregister(self.stop)

    def restart_apiserver(self) -> None:
        """Stop the kube-apiserver and start it again on the same port; etcd stays."""
        self.stop_apiserver()
        self.start_apiserver()

    def stop_apiserver(self) -> None:
        """Stop only the kube-apiserver (by PID); etcd and the work dir stay."""
        assert self.apiserver is not None, "not started"
        self.apiserver.stop(self.options.stop_timeout)

    def start_apiserver(self) -> None:
        """Start the kube-apiserver again on the same port and wait until it is ready."""
        assert self.apiserver is not None and not self.apiserver.running(), "stop it first"
        self._start_apiserver()

    # -- clients -----------------------------------------------------------

    def client_cert(self, user: str = ADMIN_USER, group: str = ADMIN_GROUP) -> tuple[Path, Path]:
        """(cert, key) files of a client certificate the API server accepts as `user`."""
        assert self.pki is not None, "not started"
        return make_client_cert(self.pki.ca_cert.parent, user, group)

    def client_configuration(self) -> Any:
        """A kubernetes.client.Configuration for the admin token."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.host
        cfg.ssl_ca_cert = str(self.ca_cert_path)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return cfg

    def api_client(self) -> ApiClient:
        """A new ApiClient for the admin token; close it (or use `with`)."""
        from kubernetes import client

        return client.ApiClient(self.client_configuration())

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET a path on the apiserver with the admin token: (status, body)."""
        request = urllib.request.Request(
            self.host + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        context = ssl.create_default_context(cafile=str(self.ca_cert_path))
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), exc.read().decode(errors="replace")

    # -- etcd --------------------------------------------------------------

    def etcd_call(self, endpoint: str, body: dict[str, Any],
                  timeout: float = 10.0) -> dict[str, Any]:
        """POST JSON to etcd's v3 HTTP gateway (e.g. "/v3/kv/range")."""
        request = urllib.request.Request(
            self.etcd_url + endpoint, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def etcd_revision(self) -> int:
        """etcd's current store revision."""
        key = base64.b64encode(b"/registry/").decode()
        reply = self.etcd_call("/v3/kv/range", {"key": key, "limit": 1, "keys_only": True})
        return int(reply["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (physically); returns that revision.

        Every resourceVersion below it becomes unreadable from etcd. A watch
        from one answers 410 Gone when the apiserver has to ask etcd: always
        with `KubeOptions(watch_cache=False)`; with the watch cache only once
        the version has left the cache's window (e.g. after
        `restart_apiserver()`, which rebuilds the cache at the current revision).
        """
        revision = self.etcd_revision()
        self.etcd_call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    # -- internals ---------------------------------------------------------

    def _work(self) -> Path:
        assert self.workdir is not None, "not started"
        return self.workdir

    def _binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise KubeStartError(f"{path} missing or not executable (run build-binaries.sh)")
        return str(path)

    def _write_token_file(self) -> None:
        (self._work() / "tokens.csv").write_text(
            f'{self.token},{ADMIN_USER},{ADMIN_USER},"{ADMIN_GROUP}"\n'
        )

    def _etcd_argv(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.etcd_client_port}"
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        argv = [
            self._binary("etcd"),
            "--name=pyproxy-realapi",
            f"--data-dir={self._work() / 'etcd-data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=pyproxy-realapi={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        if self.options.etcd_auto_compaction_retention:
            argv += ["--auto-compaction-mode=periodic",
                     f"--auto-compaction-retention={self.options.etcd_auto_compaction_retention}"]
        return argv + list(self.options.extra_etcd_args)

    def _start_etcd(self) -> None:
        self.etcd_client_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd = ManagedProcess("etcd", self._etcd_argv(), self._work() / "etcd.log")
        self.etcd.start()
        deadline = time.monotonic() + self.options.ready_timeout
        self._wait("etcd /health", self._etcd_healthy, deadline)

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")

    def _apiserver_argv(self) -> list[str]:
        assert self.pki is not None
        opts = self.options
        argv = [
            self._binary("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            # The endpoint reconciler refuses a loopback advertise address, so
            # default/kubernetes gets no endpoints (tests make their own).
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            f"--cert-dir={self._work() / 'apiserver-certs'}",
            f"--tls-cert-file={self.pki.serving_cert}",
            f"--tls-private-key-file={self.pki.serving_key}",
            f"--client-ca-file={self.pki.ca_cert}",
            f"--token-auth-file={self._work() / 'tokens.csv'}",
            f"--authorization-mode={opts.authorization_mode}",
            f"--service-cluster-ip-range={opts.service_cidr}",
            f"--service-node-port-range={opts.node_port_range}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki.sa_public_key}",
            f"--service-account-signing-key-file={self.pki.sa_private_key}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--watch-cache={'true' if opts.watch_cache else 'false'}",
            "--v=1",
        ]
        return argv + list(opts.extra_apiserver_args)

    def _start_apiserver(self) -> None:
        self.apiserver = ManagedProcess(
            "kube-apiserver", self._apiserver_argv(), self._work() / "kube-apiserver.log"
        )
        self.apiserver.start()
        deadline = time.monotonic() + self.options.ready_timeout
        self._wait("kube-apiserver /readyz", self._apiserver_ready, deadline)

    def _apiserver_ready(self) -> bool:
        status, body = self.get("/readyz", timeout=2)
        return status == 200 and body.strip() == "ok"

    def _wait(self, what: str, probe: Any, deadline: float) -> None:
        procs = [p for p in (self.etcd, self.apiserver) if p is not None]
        try:
            _wait_until(what, probe, deadline, procs)
        except KubeStartError as exc:
            tails = "\n".join(p.tail() for p in procs)
            raise KubeStartError(f"{exc}\n{tails}") from None

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.ca_cert_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "realapi", "cluster": {
                "server": self.host, "certificate-authority-data": ca_data}}],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [{"name": "realapi", "context": {
                "cluster": "realapi", "user": ADMIN_USER}}],
            "current-context": "realapi",
        }
        # JSON is YAML: kubectl and kubernetes.config.load_kube_config read it.
        self.kubeconfig_path.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig_path.chmod(0o600)
