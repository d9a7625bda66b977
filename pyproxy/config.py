"""pyproxy's configuration: one versioned YAML document, defaults in one place.

Rules kept here:
- The file is `apiVersion: pyproxy.io/v1alpha1`, `kind: PyProxyConfiguration`, with
  kube-proxy's field names where the meaning carries over (`healthzBindAddress`,
  `metricsBindAddress`, `hostnameOverride`, `clusterCIDR`, `nodePortAddresses`,
  `detectLocalMode`, `detectLocal.bridgeInterface`, `detectLocal.interfaceNamePrefix`,
  `syncPeriod`, `minSyncPeriod`, `clientConnection.kubeconfig`), and pyproxy's own under
  `dataplane`, `manifestLimits` and `lifecycle`.
- Every error names its field path; unknown fields are errors (a typo must not pass).
- Durations are written the Kubernetes way: `30s`, `100ms`, `1h30m`.
- Flags given on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

GROUP = "pyproxy.io"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "PyProxyConfiguration"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")  # model/localdetect.py
NODE_PORT_KEYWORDS = ("primary", "all")  # model/nodeports.py


class ConfigError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


@dataclass(frozen=True)
class DataplaneConfig:
    tcpProxyPort: int = 15001
    udpProxyPort: int = 15001
    mark: int = 0x200000
    reentryMark: int = 0x400000  # bridged frames re-entering on pyproxy-in (strict rp_filter's route)
    routeTable: int = 2010
    rulePriority: int = 9000
    dialTimeouts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    tcpIdleTimeout: float = 3600.0
    tcpHalfCloseTimeout: float = 300.0
    udpIdleTimeout: float = 30.0
    maxUDPFlows: int = 16384
    drainTimeout: float = 30.0
    affinityCapacity: int = 65536
    consistentAffinitySeed: str = ""
    relay: str = "splice"  # TCP byte path: "splice", the only one (the compiled engine, or its pure-Python twin)
    spliceAfter: int = 65536  # relay "splice": bytes of bulk reads in a row before a direction moves to os.splice
    workers: int = 1  # processes sharing the listener (SO_REUSEPORT, steered by client address)
    podBridges: tuple[str, ...] = ("cni0", "cbr0")  # Linux bridges pods hang off (hooked when they appear)
    nftables: str = "library"  # how transactions are applied: "library" (libnftables in-process) or "command" (nft)


@dataclass(frozen=True)
class ManifestLimits:
    """Bounds on each manifest file, checked before anything is built from it (README)."""

    maxFileSize: int = 16 * 1024 * 1024  # bytes
    maxDocuments: int = 10000
    maxDepth: int = 64  # nested mappings and lists; a Kubernetes object needs about 10
    maxAliasExpansion: int = 100_000  # nodes the aliases of one document may stand for


MAX_YAML_DEPTH = 200  # deeper, the YAML library's own recursion would fail first


@dataclass(frozen=True)
class LifecycleConfig:
    """Restarts and upgrades (pyproxy/lifecycle): where the hand-over socket and the state
    snapshot live, how fresh the snapshot is kept, and what a process does once it has
    handed everything to a successor."""

    stateDir: str = "/run/pyproxy"  # hand-over socket and snapshot (a hostPath in daemonset.yaml)
    snapshotInterval: float = 2.0  # the snapshot on disk is at most this old (0: no snapshot)
    handOverTimeout: float = 10.0  # each step of a hand-over; past it, the old process keeps serving
    # An older snapshot is not restored (0: any age). A restored one serves only until the
    # first complete list from the API server replaces it.
    snapshotMaxAge: float = 3600.0
    afterHandOver: str = "exit"  # "exit", or "wait" for SIGTERM (a DaemonSet pod: no restart loop)


@dataclass(frozen=True)
class ClientConnection:
    kubeconfig: str = ""
    apiServer: str = ""
    qps: float = 50.0


@dataclass(frozen=True)
class DetectLocal:
    """What `detectLocalMode` BridgeInterface and InterfaceNamePrefix match (kube-proxy's names)."""

    bridgeInterface: str = ""
    interfaceNamePrefix: str = ""


@dataclass(frozen=True)
class ProxyConfig:
    hostnameOverride: str = ""
    healthzBindAddress: str = "0.0.0.0:10256"
    metricsBindAddress: str = "127.0.0.1:10249"
    clusterCIDR: str = ""
    detectLocalMode: str = "ClusterCIDR"
    detectLocal: DetectLocal = field(default_factory=DetectLocal)
    nodePortAddresses: tuple[str, ...] = ()
    proxyName: str = ""
    syncPeriod: float = 30.0
    minSyncPeriod: float = 0.1
    manifests: str = ""
    manifestPollInterval: float = 0.5
    manifestLimits: ManifestLimits = field(default_factory=ManifestLimits)
    eventLoop: str = "auto"
    debugAPI: bool = True  # serve the inspection API (/debug/*) on metricsBindAddress
    clientConnection: ClientConnection = field(default_factory=ClientConnection)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, path: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(path, f"{value!r} is not a duration like 30s, 100ms or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The shortest Kubernetes-style spelling: 1h, 5m, 1m30s, 30s, 250ms, 1500ms."""
    if seconds == 0:
        return "0s"
    if seconds < 1 or seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


class _Hex(int):
    """An int that --write-config-to prints in hex (the mark is a bit mask)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Hex, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:int", f"{value:#x}"))


def load_config(text: str, source: str = "config") -> ProxyConfig:
    """Parse a config document, reporting the first problem with its field path."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(source, f"not valid YAML: {err}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(source, "must be a mapping")
    doc = dict(doc)
    if doc.pop("apiVersion", None) != API_VERSION:
        raise ConfigError("apiVersion", f"must be {API_VERSION}")
    if doc.pop("kind", None) != KIND:
        raise ConfigError("kind", f"must be {KIND}")
    config: ProxyConfig = _build(ProxyConfig, doc, "")
    validate(config)
    return config


def _build(cls: type[Any], doc: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, raw in doc.items():
        path = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(path, "unknown field")
        values[name] = _convert(fields[name], raw, path)
    return cls(**values)


def _convert(f: dataclasses.Field[Any], raw: Any, path: str) -> Any:
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(default):
        if not isinstance(raw, Mapping):
            raise ConfigError(path, "must be a mapping")
        return _build(type(default), raw, path + ".")
    if isinstance(default, tuple):
        if not isinstance(raw, list):
            raise ConfigError(path, "must be a list")
        if f.name == "dialTimeouts":
            return tuple(parse_duration(v, f"{path}[{i}]") for i, v in enumerate(raw))
        return tuple(str(v) for v in raw)
    if isinstance(default, bool) or isinstance(default, str):
        if not isinstance(raw, type(default)):
            raise ConfigError(path, f"must be a {type(default).__name__}")
        return raw
    if isinstance(default, float):
        if f.name == "qps":  # the one float that is not a duration
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
                raise ConfigError(path, f"{raw!r} must be a positive number")
            return float(raw)
        return parse_duration(raw, path)
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(path, "must be an integer")
        return raw
    raise ConfigError(path, "unsupported field")


def validate(config: ProxyConfig) -> None:
    for path in ("healthzBindAddress", "metricsBindAddress"):
        value = getattr(config, path)
        if value:
            split_host_port(value, path)
    for i, cidr in enumerate(config.nodePortAddresses):
        if cidr not in NODE_PORT_KEYWORDS:
            _cidr(cidr, f"nodePortAddresses[{i}]", "a CIDR or one of primary, all")
    for i, cidr in enumerate(c for c in config.clusterCIDR.split(",") if c):
        _cidr(cidr, f"clusterCIDR[{i}]")
    _validate_detect_local(config)
    if config.eventLoop not in EVENT_LOOPS:
        raise ConfigError("eventLoop", f"{config.eventLoop!r} is not one of {', '.join(EVENT_LOOPS)}")
    dp = config.dataplane
    for path, port in (("dataplane.tcpProxyPort", dp.tcpProxyPort), ("dataplane.udpProxyPort", dp.udpProxyPort)):
        if not 1 <= port <= 65535:
            raise ConfigError(path, f"{port} is not a port number")
    if dp.mark <= 0 or dp.mark & (dp.mark - 1):
        raise ConfigError("dataplane.mark", f"{dp.mark:#x} must be a single bit")
    if dp.reentryMark <= 0 or dp.reentryMark & (dp.reentryMark - 1) or dp.reentryMark == dp.mark:
        raise ConfigError("dataplane.reentryMark", f"{dp.reentryMark:#x} must be a single bit other than mark")
    if not dp.dialTimeouts or any(t <= 0 for t in dp.dialTimeouts):
        raise ConfigError("dataplane.dialTimeouts", "needs at least one positive timeout")
    for name in ("maxUDPFlows", "affinityCapacity"):
        if getattr(dp, name) < 1:
            raise ConfigError(f"dataplane.{name}", "must be at least 1")
    if dp.relay == "protocol":
        raise ConfigError("dataplane.relay", "'protocol' (the asyncio Protocol relay) was removed: drop the line; "
                                             "the relay is splice (the compiled engine or its pure-Python twin)")
    if dp.relay != "splice":
        raise ConfigError("dataplane.relay", f"{dp.relay!r} must be splice")
    if dp.nftables not in ("library", "command"):
        raise ConfigError("dataplane.nftables", f"{dp.nftables!r} must be library or command")
    for i, name in enumerate(dp.podBridges):
        if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", name):
            raise ConfigError(f"dataplane.podBridges[{i}]", f"{name!r} is not an interface name")
    if not 1 <= dp.workers <= 64:
        raise ConfigError("dataplane.workers", f"{dp.workers} must be in [1, 64]")
    for limit in dataclasses.fields(ManifestLimits):
        if getattr(config.manifestLimits, limit.name) < 1:
            raise ConfigError(f"manifestLimits.{limit.name}", "must be at least 1")
    if config.manifestLimits.maxDepth > MAX_YAML_DEPTH:
        raise ConfigError("manifestLimits.maxDepth", f"{config.manifestLimits.maxDepth} must be at most {MAX_YAML_DEPTH}")
    life = config.lifecycle
    if life.afterHandOver not in ("exit", "wait"):
        raise ConfigError("lifecycle.afterHandOver", f"{life.afterHandOver!r} must be exit or wait")
    if not life.stateDir.startswith("/") or len(life.stateDir) > 80:
        raise ConfigError("lifecycle.stateDir", f"{life.stateDir!r} must be an absolute path of at most 80 characters"
                          " (the hand-over socket's path must fit a unix socket address)")
    if life.snapshotInterval < 0 or life.handOverTimeout <= 0 or life.snapshotMaxAge < 0:
        raise ConfigError("lifecycle", "snapshotInterval and snapshotMaxAge must be >= 0 and handOverTimeout positive")
    if config.minSyncPeriod < 0 or config.syncPeriod <= 0:
        raise ConfigError("syncPeriod", "sync periods must be positive")


def _validate_detect_local(config: ProxyConfig) -> None:
    mode, detect = config.detectLocalMode, config.detectLocal
    if mode not in DETECT_LOCAL_MODES:
        raise ConfigError("detectLocalMode", f"{mode!r} is not one of {', '.join(DETECT_LOCAL_MODES)}")
    if mode == "BridgeInterface" and not detect.bridgeInterface:
        raise ConfigError("detectLocal.bridgeInterface", "must be set when detectLocalMode is BridgeInterface")
    if mode == "InterfaceNamePrefix" and not detect.interfaceNamePrefix:
        raise ConfigError("detectLocal.interfaceNamePrefix", "must be set when detectLocalMode is InterfaceNamePrefix")
    for path, name in (("detectLocal.bridgeInterface", detect.bridgeInterface),
                       ("detectLocal.interfaceNamePrefix", detect.interfaceNamePrefix)):
        if name and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", name):
            raise ConfigError(path, f"{name!r} is not an interface name")


def _cidr(value: str, path: str, expected: str = "an IPv4 or IPv6 CIDR") -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(path, f"{value!r} is not {expected}") from None


def node_name_of(config: ProxyConfig) -> str:
    """The node this proxy serves: `hostnameOverride`, else the host's name (as kube-proxy)."""
    return config.hostnameOverride or socket.gethostname()


def split_host_port(value: str, path: str) -> tuple[str, int]:
    """`host:port`, `[IPv6]:port` or `:port` (every IPv4 address)."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(path, f"{value!r}: write an IPv6 address as [address]:port")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(path, f"{value!r} is not host:port")
    return host or "0.0.0.0", int(port)


def dump_config(config: ProxyConfig) -> str:
    """The config as a document `load_config` accepts (used by --write-config-to)."""
    doc = config_document(config)
    dp = doc["dataplane"]
    dp["mark"] = _Hex(dp["mark"])
    dp["reentryMark"] = _Hex(dp["reentryMark"])
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def config_document(config: ProxyConfig) -> dict[str, Any]:
    """The config as plain data, durations spelled as in the file (also served at /configz)."""
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    body = plain(config)
    for key in ("syncPeriod", "minSyncPeriod", "manifestPollInterval"):
        body[key] = format_duration(body[key])
    dp = body["dataplane"]
    for key in ("tcpIdleTimeout", "tcpHalfCloseTimeout", "udpIdleTimeout", "drainTimeout"):
        dp[key] = format_duration(dp[key])
    dp["dialTimeouts"] = [format_duration(t) for t in dp["dialTimeouts"]]
    for key in ("snapshotInterval", "handOverTimeout", "snapshotMaxAge"):
        body["lifecycle"][key] = format_duration(body["lifecycle"][key])
    return {"apiVersion": API_VERSION, "kind": KIND, **body}
