"""Where the API server is and how to prove who we are, without the `kubernetes` package.

Rules kept here:
- Three ways in, as kube-proxy has them: a kubeconfig (one file or a `:`-separated list,
  merged as kubectl merges: the first file to name a cluster, user or context wins, the
  first `current-context` wins), an explicit master (`--master`; it overrides the
  kubeconfig's server, and without a kubeconfig uses the pod's service-account token and CA
  when present), or in-cluster (KUBERNETES_SERVICE_HOST/PORT and the service account).
- TLS: a CA from a file or inline data (else the system's), `insecure-skip-tls-verify`,
  `tls-server-name`, client certificates from files or inline data (loaded through a memfd:
  the key never touches a disk). Credentials: a bearer token, a token file (read again at
  every request, so a rotated service-account token is picked up), basic auth, or an
  exec plugin (client.authentication.k8s.io, kept until its expiry or a 401).
- `auth-provider` users (legacy gcp/azure/oidc plug-ins) are not handled here:
  `needs_full_client` says so and the caller uses the `kubernetes` package for them.
- Relative paths in a kubeconfig are relative to the file that holds them.
- Every problem is a `ConfigProblem` naming what is wrong; nothing here talks to the network.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
EXEC_TIMEOUT = 60.0  # seconds an exec credential plugin may take
EXEC_EARLY = 10.0  # renew an exec credential this long before it expires


class ConfigProblem(ValueError):
    """The connection settings cannot be loaded (the message says which and why)."""


def master_url(master: str) -> str:
    """`host:port` (kube-proxy's --master) or a full URL -> a URL; https unless told."""
    return master if "://" in master else f"https://{master}"


@dataclass(frozen=True)
class Tls:
    """How to check the server and which client certificate to show (PEM bytes or paths)."""

    ca_data: bytes | None = None
    ca_file: str | None = None
    insecure: bool = False
    server_name: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass
class Auth:
    """Who we are: the Authorization header and, from an exec plugin, a client certificate."""

    token: str | None = None
    token_file: str | None = None
    basic: tuple[str, str] | None = None
    plugin: ExecPlugin | None = None

    def header(self) -> str | None:
        if self.plugin is not None:
            token = self.plugin.credential().get("token")
            if isinstance(token, str) and token:
                return f"Bearer {token}"
        if self.token:
            return f"Bearer {self.token}"
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as err:
                raise ConfigProblem(f"token file {self.token_file}: {err}") from None
            return f"Bearer {token}"
        if self.basic is not None:
            user_pass = f"{self.basic[0]}:{self.basic[1]}".encode()
            return f"Basic {base64.b64encode(user_pass).decode()}"
        return None

    def client_cert(self) -> tuple[bytes, bytes] | None:
        if self.plugin is None:
            return None
        status = self.plugin.credential()
        cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
        return (cert.encode(), key.encode()) if isinstance(cert, str) and isinstance(key, str) and cert else None

    def rejected(self) -> None:
        """The server answered 401: an exec plugin's credential is renewed at the next request."""
        if self.plugin is not None:
            self.plugin.forget()


@dataclass
class Connection:
    """One API server: its URL, TLS settings and credentials; `context()` is cached."""

    server: str
    tls: Tls = field(default_factory=Tls)
    auth: Auth = field(default_factory=Auth)
    _cached: tuple[object, ssl.SSLContext] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> tuple[str, int, bool]:
        """(host, port, https?) from the server URL."""
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigProblem(f"server {self.server!r} is not an http(s) URL")
        https = parts.scheme == "https"
        return parts.hostname, parts.port or (443 if https else 80), https

    @property
    def base_path(self) -> str:
        return urlsplit(self.server).path.rstrip("/")

    def context(self) -> ssl.SSLContext:
        """The TLS context, rebuilt only when an exec plugin hands out another certificate."""
        cert = self.auth.client_cert()
        with self._lock:
            if self._cached is None or self._cached[0] != cert:
                self._cached = (cert, ssl_context(self.tls, cert))
            return self._cached[1]


def ssl_context(tls: Tls, exec_cert: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_data or tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file, cadata=tls.ca_data.decode() if tls.ca_data else None)
    try:
        if exec_cert is not None:
            _load_cert_data(context, *exec_cert)
        elif tls.cert_data and tls.key_data:
            _load_cert_data(context, tls.cert_data, tls.key_data)
        elif tls.cert_file and tls.key_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as err:
        raise ConfigProblem(f"client certificate: {err}") from None
    return context


def _load_cert_data(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """load_cert_chain wants paths: give it memfds, so the key never reaches a disk."""
    fds = [os.memfd_create("pyproxy-client-cert"), os.memfd_create("pyproxy-client-key")]
    try:
        for fd, data in zip(fds, (cert, key)):
            os.write(fd, data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


# -- exec credential plugins ------------------------------------------------------------------


@dataclass
class ExecPlugin:
    """A client.authentication.k8s.io exec plugin, run again only when its credential expires."""

    command: str
    args: list[str]
    env: dict[str, str]
    api_version: str
    cluster: dict[str, Any] | None = None  # given to the plugin when it asks (provideClusterInfo)
    _status: dict[str, Any] | None = None
    _expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def credential(self) -> dict[str, Any]:
        with self._lock:
            if self._status is None or time.time() >= self._expires:
                self._status, self._expires = self._run()
            return self._status

    def forget(self) -> None:
        with self._lock:
            self._status = None

    def _run(self) -> tuple[dict[str, Any], float]:
        spec: dict[str, Any] = {"interactive": False}
        if self.cluster is not None:
            spec["cluster"] = self.cluster
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            done = subprocess.run([self.command, *self.args], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=EXEC_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConfigProblem(f"exec plugin {self.command}: {err}") from None
        if done.returncode != 0:
            raise ConfigProblem(f"exec plugin {self.command} exited {done.returncode}: "
                                f"{done.stderr.decode(errors='replace').strip()[:300]}")
        try:
            status = json.loads(done.stdout)["status"]
        except (ValueError, KeyError, TypeError):
            raise ConfigProblem(f"exec plugin {self.command}: its output is not an ExecCredential") from None
        if not isinstance(status, dict):
            raise ConfigProblem(f"exec plugin {self.command}: its ExecCredential has no status")
        return status, _expiry(status.get("expirationTimestamp"))


def _expiry(stamp: Any) -> float:
    """An RFC 3339 expirationTimestamp -> when to run the plugin again (never, without one)."""
    if not isinstance(stamp, str) or not stamp:
        return float("inf")
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0  # unreadable: run it again at the next request
    return when.timestamp() - EXEC_EARLY


# -- loading ----------------------------------------------------------------------------------


def load(kubeconfig: str, master: str) -> Connection | None:
    """Connect settings from a kubeconfig, an explicit master or in-cluster.

    None when the kubeconfig's user needs an auth-provider (the caller falls back to the
    `kubernetes` package).
    """
    if kubeconfig:
        connection = from_kubeconfig(kubeconfig)
        if connection is not None and master:
            connection.server = master_url(master)
        return connection
    if master and os.path.exists(f"{SERVICE_ACCOUNT_DIR}/token"):
        return service_account(master_url(master))
    if master:
        return Connection(master_url(master))
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigProblem("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
    return service_account(f"https://{'[' + host + ']' if ':' in host else host}:{port}")


def service_account(url: str) -> Connection:
    ca = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    if not os.path.exists(ca):
        raise ConfigProblem(f"{ca} is missing")
    return Connection(url, Tls(ca_file=ca), Auth(token_file=f"{SERVICE_ACCOUNT_DIR}/token"))


Named = dict[str, tuple[Mapping[str, Any], Path]]  # name -> (its body, the directory of its file)


def from_kubeconfig(paths: str) -> Connection | None:
    clusters: Named = {}
    users: Named = {}
    contexts: Named = {}
    current: str | None = None
    found = []
    for path in (p for p in paths.split(":") if p):
        doc = _read(Path(path))
        if doc is None:
            continue
        found.append(path)
        base = Path(path).resolve().parent
        for section, key, into in (("clusters", "cluster", clusters), ("users", "user", users),
                                   ("contexts", "context", contexts)):
            entries = doc.get(section) or []
            if not isinstance(entries, list):
                raise ConfigProblem(f"{path}: {section} is not a list")
            for entry in entries:
                name = entry.get("name") if isinstance(entry, Mapping) else None
                if isinstance(name, str) and name not in into:
                    into[name] = (_mapping(entry.get(key), f"{path}: {section} {name}"), base)
        current = current or (doc.get("current-context") or None)
    if not found:
        raise ConfigProblem(f"{paths}: no kubeconfig found")
    if not isinstance(current, str) or current not in contexts:
        raise ConfigProblem(f"{paths}: current-context {current!r} is not among the contexts")
    context = contexts[current][0]
    cluster_name, user_name = context.get("cluster"), context.get("user")
    if cluster_name not in clusters:
        raise ConfigProblem(f"{paths}: context {current} names no known cluster ({cluster_name!r})")
    cluster, cluster_dir = clusters[cluster_name]
    user, user_dir = users.get(user_name, ({}, cluster_dir)) if isinstance(user_name, str) else ({}, cluster_dir)
    if user.get("auth-provider"):
        return None
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigProblem(f"{paths}: cluster {cluster_name} has no server")
    tls = Tls(
        ca_data=_data(cluster, "certificate-authority-data"),
        ca_file=_file(cluster, "certificate-authority", cluster_dir),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        server_name=cluster.get("tls-server-name") or None,
        cert_data=_data(user, "client-certificate-data"), key_data=_data(user, "client-key-data"),
        cert_file=_file(user, "client-certificate", user_dir), key_file=_file(user, "client-key", user_dir),
    )
    return Connection(server, tls, _auth(user, user_dir, server, tls))


def _auth(user: Mapping[str, Any], base: Path, server: str, tls: Tls) -> Auth:
    plugin = None
    spec = user.get("exec")
    if isinstance(spec, Mapping):
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise ConfigProblem("exec plugin without a command")
        cluster = None
        if spec.get("provideClusterInfo"):
            cluster = {"server": server, "insecure-skip-tls-verify": tls.insecure}
            if tls.ca_data:
                cluster["certificate-authority-data"] = base64.b64encode(tls.ca_data).decode()
        plugin = ExecPlugin(
            command=str(base / command) if "/" in command and not command.startswith("/") else command,
            args=[str(a) for a in spec.get("args") or []],
            env={str(e["name"]): str(e["value"]) for e in spec.get("env") or [] if isinstance(e, Mapping)},
            api_version=str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
            cluster=cluster,
        )
    username, password = user.get("username"), user.get("password")
    return Auth(
        token=user.get("token") or None,
        token_file=_file(user, "tokenFile", base),
        basic=(str(username), str(password)) if username and password else None,
        plugin=plugin,
    )


def _read(path: Path) -> Mapping[str, Any] | None:
    import yaml  # already loaded by pyproxy.config; JSON is YAML

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigProblem(f"{path}: {err}") from None
    try:
        doc = yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise ConfigProblem(f"{path}: not YAML: {err}") from None
    if not isinstance(doc, Mapping):
        raise ConfigProblem(f"{path}: not a kubeconfig (a mapping)")
    return doc


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigProblem(f"{where}: not a mapping")
    return value


def _data(section: Mapping[str, Any], key: str) -> bytes | None:
    value = section.get(key)
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=False)
    except ValueError:
        raise ConfigProblem(f"{key} is not base64") from None


def _file(section: Mapping[str, Any], key: str, base: Path) -> str | None:
    value = section.get(key)
    return str(base / str(value)) if value else None
