"""The versioned config: defaults round-trip through --write-config-to and --config, every
error names its field path, and flags given on the command line win over the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pyproxy.cli import build_parser, effective_config, main
from pyproxy.config import (
    API_VERSION,
    KIND,
    ConfigError,
    ProxyConfig,
    dump_config,
    load_config,
    parse_duration,
    split_host_port,
)


def doc(**fields: object) -> str:
    return yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, **fields})


def test_defaults_round_trip() -> None:
    assert load_config(dump_config(ProxyConfig())) == ProxyConfig()


def test_a_changed_config_round_trips() -> None:
    config = load_config(doc(
        hostnameOverride="node7", syncPeriod="1m30s", minSyncPeriod="250ms", nodePortAddresses=["192.168.0.0/16"],
        clusterCIDR="10.244.0.0/16", clientConnection={"kubeconfig": "/k", "apiServer": "https://10.0.0.1:6443", "qps": 5},
        dataplane={"dialTimeouts": ["100ms", "1s"], "tcpIdleTimeout": "2h", "mark": 0x800000, "affinityCapacity": 10},
    ))
    assert config.syncPeriod == 90.0 and config.minSyncPeriod == 0.25
    assert config.dataplane.dialTimeouts == (0.1, 1.0) and config.dataplane.tcpIdleTimeout == 7200.0
    assert config.clientConnection.qps == 5.0
    assert load_config(dump_config(config)) == config


def test_write_config_to_then_config_round_trips_through_the_cli(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    assert main(["--write-config-to", str(first), "--hostname-override", "n1", "--metrics-bind-address",
                 "0.0.0.0:9999", "--nodeport-addresses", "10.0.0.0/8, 192.168.0.0/16"]) == 0
    second = tmp_path / "second.yaml"
    assert main(["--config", str(first), "--write-config-to", str(second)]) == 0
    assert first.read_text() == second.read_text()
    config = load_config(second.read_text())
    assert config.hostnameOverride == "n1" and config.metricsBindAddress == "0.0.0.0:9999"
    assert config.nodePortAddresses == ("10.0.0.0/8", "192.168.0.0/16")


def test_written_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    out = tmp_path / "defaults.yaml"
    assert main(["--write-config-to", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["apiVersion"] == API_VERSION and written["kind"] == KIND
    assert written["healthzBindAddress"] == "0.0.0.0:10256"
    assert written["metricsBindAddress"] == "127.0.0.1:10249"
    assert written["syncPeriod"] == "30s" and written["minSyncPeriod"] == "100ms"


def cli_config(tmp_path: Path, text: str, *flags: str) -> ProxyConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return effective_config(build_parser().parse_args(["--config", str(path), *flags]))


def test_flags_override_the_file(tmp_path: Path) -> None:
    text = doc(hostnameOverride="from-file", healthzBindAddress="0.0.0.0:1", metricsBindAddress="127.0.0.1:2",
               clusterCIDR="10.0.0.0/8", nodePortAddresses=["10.0.0.0/8"], manifests="/file",
               clientConnection={"kubeconfig": "/file/kubeconfig", "apiServer": "https://file:6443"},
               dataplane={"tcpProxyPort": 1000, "udpProxyPort": 1000, "drainTimeout": "5s"})
    untouched = cli_config(tmp_path, text)
    assert untouched.hostnameOverride == "from-file" and untouched.dataplane.tcpProxyPort == 1000
    config = cli_config(
        tmp_path, text, "--hostname-override", "from-flag", "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "0.0.0.0:10249", "--cluster-cidr", "10.244.0.0/16",
        "--nodeport-addresses", "192.168.0.0/16", "--manifests", "/flag", "--kubeconfig", "/flag/kubeconfig",
        "--master", "https://flag:6443", "--proxy-port", "2000",
    )
    assert config == dataclasses.replace(
        untouched, hostnameOverride="from-flag", healthzBindAddress="127.0.0.1:10256",
        metricsBindAddress="0.0.0.0:10249", clusterCIDR="10.244.0.0/16", nodePortAddresses=("192.168.0.0/16",),
        manifests="/flag",
        clientConnection=dataclasses.replace(untouched.clientConnection, kubeconfig="/flag/kubeconfig",
                                             apiServer="https://flag:6443"),
        dataplane=dataclasses.replace(untouched.dataplane, tcpProxyPort=2000, udpProxyPort=2000),
    )
    assert config.dataplane.drainTimeout == 5.0  # fields no flag names keep the file's value


@pytest.mark.parametrize(("text", "path"), [
    (doc(bogus=1), "bogus"),
    (doc(dataplane={"bogus": 1}), "dataplane.bogus"),
    (doc(clientConnection={"kubeConfig": "/k"}), "clientConnection.kubeConfig"),
    (doc(syncPeriod="soon"), "syncPeriod"),
    (doc(syncPeriod="0s"), "syncPeriod"),
    (doc(minSyncPeriod="-1s"), "minSyncPeriod"),
    (doc(hostnameOverride=7), "hostnameOverride"),
    (doc(nodePortAddresses="10.0.0.0/8"), "nodePortAddresses"),
    (doc(nodePortAddresses=["10.0.0.0/8", "nonsense"]), "nodePortAddresses[1]"),
    (doc(clusterCIDR="10.0.0.0/8,bad"), "clusterCIDR[1]"),
    (doc(healthzBindAddress="10256"), "healthzBindAddress"),
    (doc(metricsBindAddress="127.0.0.1:99999"), "metricsBindAddress"),
    (doc(metricsBindAddress="::1:10249"), "metricsBindAddress"),  # IPv6 without brackets is ambiguous
    (doc(clientConnection={"qps": "fast"}), "clientConnection.qps"),
    (doc(clientConnection=[]), "clientConnection"),
    (doc(dataplane={"tcpProxyPort": "15001"}), "dataplane.tcpProxyPort"),
    (doc(dataplane={"tcpProxyPort": 70000}), "dataplane.tcpProxyPort"),
    (doc(dataplane={"udpProxyPort": True}), "dataplane.udpProxyPort"),
    (doc(dataplane={"mark": 3}), "dataplane.mark"),
    (doc(dataplane={"dialTimeouts": ["1s", "later"]}), "dataplane.dialTimeouts[1]"),
    (doc(dataplane={"dialTimeouts": []}), "dataplane.dialTimeouts"),
    (doc(dataplane={"affinityCapacity": 0}), "dataplane.affinityCapacity"),
    (doc(dataplane={"maxUDPFlows": 0}), "dataplane.maxUDPFlows"),
    (doc(dataplane={"drainTimeout": "1 minute"}), "dataplane.drainTimeout"),
    (doc(dataplane={"relay": "copy"}), "dataplane.relay"),
    (yaml.safe_dump({"apiVersion": "v1", "kind": KIND}), "apiVersion"),
    (yaml.safe_dump({"apiVersion": API_VERSION, "kind": "KubeProxyConfiguration"}), "kind"),
    ("- a list", "config"),
    ("a: [unclosed", "config"),
])
def test_every_error_names_its_field_path(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(text)
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ")


def test_the_removed_protocol_relay_is_refused_with_what_to_do() -> None:
    """A config written for a release that had the Protocol relay fails at start, saying why and how to fix it."""
    with pytest.raises(ConfigError) as err:
        load_config(doc(dataplane={"relay": "protocol"}))
    assert err.value.path == "dataplane.relay"
    assert "was removed: drop the line" in str(err.value)
    assert load_config(doc(dataplane={"relay": "splice"})).dataplane.relay == "splice"


def test_flag_errors_name_the_field_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as err:
        effective_config(build_parser().parse_args(["--healthz-bind-address", "nope"]))
    assert err.value.path == "healthzBindAddress"
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc(dataplane={"mark": 3}))
    assert main(["--config", str(bad), "--write-config-to", "-"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), "--write-config-to", "-"]) == 2


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("100ms", 0.1), ("1h30m", 5400.0), ("1.5s", 1.5), (45, 45.0), (0.5, 0.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


def test_manifest_limits_have_defaults_and_can_be_set() -> None:
    limits = ProxyConfig().manifestLimits
    assert (limits.maxFileSize, limits.maxDocuments, limits.maxDepth, limits.maxAliasExpansion) == (
        16 * 1024 * 1024, 10000, 64, 100000)
    assert "maxAliasExpansion: 100000" in dump_config(ProxyConfig())
    config = load_config(doc(manifestLimits={"maxDepth": 20, "maxFileSize": 1024}))
    assert config.manifestLimits.maxDepth == 20 and config.manifestLimits.maxFileSize == 1024


@pytest.mark.parametrize(
    ("limits", "path"),
    [
        ({"maxDepth": 0}, "manifestLimits.maxDepth"),
        ({"maxDepth": 5000}, "manifestLimits.maxDepth"),
        ({"maxDocuments": "many"}, "manifestLimits.maxDocuments"),
        ({"maxAliases": 3}, "manifestLimits.maxAliases"),
        ({"maxFileSize": -1}, "manifestLimits.maxFileSize"),
    ],
)
def test_bad_manifest_limits_name_their_field(limits: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(doc(manifestLimits=limits))
    assert info.value.path == path


def test_dual_stack_cidrs_and_bracketed_ipv6_bind_addresses_are_accepted() -> None:
    config = load_config(doc(clusterCIDR="10.244.0.0/16,fd00:244::/56", nodePortAddresses=["fd00:56::/64"],
                             metricsBindAddress="[::1]:10249", healthzBindAddress="[::]:10256"))
    assert config.clusterCIDR == "10.244.0.0/16,fd00:244::/56"
    assert split_host_port(config.metricsBindAddress, "m") == ("::1", 10249)
    assert split_host_port(config.healthzBindAddress, "h") == ("::", 10256)
