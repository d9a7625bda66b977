"""Bad manifest files against a real proxy (issue 11): one test per class of fault.

Each asserts what a user sees: the log line names the file, the object, the field and the
reason; the other Services keep serving meanwhile; /healthz stays 200; and the watcher goes
on applying later good changes. The source does not depend on the byte path, so one
variant (the default: splice relay on uvloop) is enough here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyproxy.demo import manifests as m
from pyproxy.demo.cluster import Cluster
from pyproxy.demo.lab import write_manifest
from tests.kernel.conftest import _cluster
from tests.kernel.test_storms import fetch
from tests.unit.test_hostile_input import alias_bomb

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    for built in _cluster(("--event-loop", "uvloop")):
        built.apply(m.service("steady", "10.96.6.1", [m.port(80, 80)]),
                    m.endpoint_slice("steady", built.backends("pa"), [m.slice_port(80)]), name="steady.yaml")
        yield built


def steady_is_served(cluster: Cluster) -> None:
    lines = cluster.run("client", "who", "10.96.6.1:80", "--count", "3", "--timeout", "5")
    assert all("pod=pa" in line for line in lines), lines


def healthz(cluster: Cluster) -> str:
    return fetch(cluster, "node1", "http://127.0.0.1:10256/healthz")


def later_change_applies(cluster: Cluster, name: str, ip: str) -> None:
    """A good change written after the bad file is applied and served."""
    cluster.apply(m.service(name, ip, [m.port(80, 80)]),
                  m.endpoint_slice(name, cluster.backends("pb"), [m.slice_port(80)]), name=f"{name}.yaml", nodes=["node1"])
    lines = cluster.run("client", "who", f"{ip}:80", "--count", "2", "--timeout", "5")
    assert all("pod=pb" in line for line in lines), lines


def write_bad(cluster: Cluster, name: str, text: str) -> None:
    write_manifest(cluster.manifest_dir("node1"), name, text)


def remove(cluster: Cluster, name: str) -> None:
    (cluster.manifest_dir("node1") / name).unlink()


def test_deep_yaml_is_refused_with_its_file_and_limit_and_the_watcher_goes_on(cluster: Cluster) -> None:
    seen = cluster.log("node1").count("maxDepth")
    write_bad(cluster, "deep.yaml", "kind: Service\nmetadata: {name: deep}\nspec: " + "[" * 400 + "]" * 400 + "\n")
    cluster.wait_for_log("node1", "maxDepth", seen)
    line = [x for x in cluster.log("node1").splitlines() if "maxDepth" in x][-1]
    assert "manifest reload refused, last good state keeps serving" in line and "deep.yaml" in line
    steady_is_served(cluster)
    assert healthz(cluster).startswith("{")  # 200: the last good state is applied, nothing is down
    remove(cluster, "deep.yaml")
    later_change_applies(cluster, "afterdeep", "10.96.6.2")


def test_an_alias_bomb_is_refused_fast_and_connections_never_wait(cluster: Cluster) -> None:
    seen = cluster.log("node1").count("maxAliasExpansion")
    write_bad(cluster, "bomb.yaml", alias_bomb())
    lines = cluster.run("client", "connect", "10.96.6.1:80", "--count", "20", "--interval", "0.05", "--timeout", "2")
    cluster.wait_for_log("node1", "maxAliasExpansion", seen)
    assert all(line.startswith("ok") and float(line.split()[1]) < 500 for line in lines), lines
    assert "bomb.yaml: aliases expand to more than 100000 nodes" in cluster.log("node1")
    remove(cluster, "bomb.yaml")
    later_change_applies(cluster, "afterbomb", "10.96.6.3")


def test_a_fifo_is_skipped_with_a_line_naming_it(cluster: Cluster) -> None:
    seen = cluster.log("node1").count("pipe.yaml: not a regular file")
    os.mkfifo(cluster.manifest_dir("node1") / "pipe.yaml")
    try:
        later_change_applies(cluster, "afterfifo", "10.96.6.4")  # the reload is not blocked by the FIFO
        cluster.wait_for_log("node1", "pipe.yaml: not a regular file (a FIFO); skipped", seen)
        steady_is_served(cluster)
    finally:
        remove(cluster, "pipe.yaml")


def test_a_bad_zone_label_names_file_node_and_field_and_syncs_go_on(cluster: Cluster) -> None:
    node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": ["a", "b"]}}}
    seen = cluster.log("node1").count("zone label skipped")
    write_bad(cluster, "node.yaml", m.dump(node))
    cluster.wait_for_log("node1", "zone label skipped", seen)
    line = [x for x in cluster.log("node1").splitlines() if "zone label skipped" in x][-1]
    assert "node.yaml[0]: Node node1: metadata.labels['topology.kubernetes.io/zone']: expected a string" in line
    later_change_applies(cluster, "afterzone", "10.96.6.5")
    assert "sync failed" not in cluster.log("node1")
    remove(cluster, "node.yaml")


def test_a_mixed_tcp_and_sctp_service_serves_its_tcp_port(cluster: Cluster) -> None:
    service = m.service("mixed", "10.96.6.6", [m.port(80, 80, name="web"), m.port(3868, 3868, name="sig", protocol="SCTP")])
    endpoint_slice = m.endpoint_slice("mixed", cluster.backends("pb"),
                                      [m.slice_port(80, name="web"), m.slice_port(3868, name="sig", protocol="SCTP")])
    cluster.apply(service, endpoint_slice, name="mixed.yaml", nodes=["node1"])
    lines = cluster.run("client", "who", "10.96.6.6:80", "--count", "3", "--timeout", "5")
    assert all("pod=pb" in line for line in lines), lines
    log = cluster.log("node1")
    assert ("mixed.yaml[0]: Service default/mixed: spec.ports[1].protocol: protocol SCTP is not supported by pyproxy "
            "(TCP, UDP) (port skipped)") in log
    assert "mixed.yaml[1]: EndpointSlice default/mixed-abc12: ports[1].protocol" in log and "ports[1].protocol" in log


def test_wrong_types_skip_only_their_part_and_health_stays_good(cluster: Cluster) -> None:
    service = m.service("typed", "10.96.6.7", [m.port(80, 80, name="web"), m.port(81, 81, name="bad")])
    service["spec"]["ports"][1]["port"] = {"not": "a number"}
    service["spec"]["externalIPs"] = [["192.0.2.9"]]
    endpoint_slice = m.endpoint_slice("typed", cluster.backends("pa", "pb"), [m.slice_port(80, name="web")])
    endpoint_slice["endpoints"][1]["conditions"] = {"ready": "yes"}
    cluster.apply(service, endpoint_slice, name="typed.yaml", nodes=["node1"])
    lines = cluster.run("client", "who", "10.96.6.7:80", "--count", "6", "--timeout", "5")
    assert {line.split()[0] for line in lines} == {"pod=pa"}, "the endpoint with a bad condition is left out"
    log = cluster.log("node1")
    for text in ("typed.yaml[0]: Service default/typed: spec.ports[1].port: a mapping of 1 entries is not a port number",
                 "typed.yaml[0]: Service default/typed: spec.externalIPs[0]: expected a string",
                 "typed.yaml[1]: EndpointSlice default/typed-abc12: endpoints[1].conditions.ready: 'yes' is not true or false"):
        assert text in log
    assert healthz(cluster).startswith("{") and '"nodeEligible": true' in healthz(cluster)
    time.sleep(0.1)
    steady_is_served(cluster)
