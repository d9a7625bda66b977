"""pyproxy's own API client (sources/kube_config.py + kube_http.py) against a real kube-apiserver.

Each way of proving who we are that kind and a DaemonSet need: a bearer token in a
kubeconfig, a client certificate (inline data and files), a service account's token (the
in-cluster path: KUBERNETES_SERVICE_HOST/PORT, a token file, the CA), an exec plugin, and a
tls-server-name. Each must list, watch and post as the proxy does; a wrong credential must
be a 401 StatusError, a wrong server name a TLS error.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import stat
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pyproxy.sources import kube_config
from pyproxy.sources.kube_client import StatusError
from pyproxy.sources.kube_http import HttpTransport, open_transport
from pyproxy.sources.kube_watch import Kind, WatchTiming
from tests.realapi.kube import KubeAPIServer

pytestmark = pytest.mark.realapi

TIMING = WatchTiming(connect_timeout=5, list_timeout=10, silence_timeout=10, page_size=2)
SERVICES = Kind("Service")


def kubeconfig(kube: KubeAPIServer, path: Path, user: dict[str, Any], **cluster: Any) -> str:
    cluster = {"server": kube.host, "certificate-authority": str(kube.ca_cert_path), **cluster}
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return str(path)


def list_all(transport: Any, kind: Kind = SERVICES) -> list[str]:
    names, token = [], None
    for _ in range(100):
        body = transport.list_page(kind, token, TIMING)
        names += [item["metadata"]["name"] for item in body["items"]]
        token = body["metadata"].get("continue")
        if not token:
            return names
    raise AssertionError("the list never ended")


@pytest.fixture(scope="module")
def services(kube: KubeAPIServer) -> Iterator[list[str]]:
    """Five Services, so that a page size of 2 needs three pages."""
    names = [f"lean-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        for name in names:
            core.create_namespaced_service("default", client.V1Service(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)])))
        yield names
        for name in names:
            core.delete_namespaced_service(name, "default")


def check_lists_and_watches(transport: Any, services: list[str]) -> None:
    assert set(services) <= set(list_all(transport))
    body = transport.list_page(SERVICES, None, TIMING)
    rv = body["metadata"]["resourceVersion"]
    events = transport.watch(SERVICES, rv, WatchTiming(silence_timeout=10), 1)  # the server ends it after 1 s
    assert all(isinstance(e, dict) for e in events)  # ended cleanly: no exception
    transport.close()  # the first page's connection, left open for the next page


def test_a_token_kubeconfig_lists_watches_and_posts(kube: KubeAPIServer, services: list[str], tmp_path: Path) -> None:
    transport = open_transport(kubeconfig(kube, tmp_path / "kc", {"token": kube.token}), "")
    assert isinstance(transport, HttpTransport)
    check_lists_and_watches(transport, services)
    event = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
             "metadata": {"name": f"lean.{uuid.uuid4().hex[:8]}", "namespace": "default"},
             "eventTime": "2026-01-02T03:04:05.678901Z", "reportingController": "pyproxy",
             "reportingInstance": "pyproxy-test", "action": "Test", "reason": "Test", "type": "Normal",
             "regarding": {"apiVersion": "v1", "kind": "Node", "name": "n"}, "note": "lean client"}
    transport.post_event("default", event)
    status, body = kube.get(f"/apis/events.k8s.io/v1/namespaces/default/events/{event['metadata']['name']}")
    assert status == 200 and "lean client" in body


def test_a_wrong_token_is_a_401(kube: KubeAPIServer, tmp_path: Path) -> None:
    transport = open_transport(kubeconfig(kube, tmp_path / "kc", {"token": "wrong"}), "")
    with pytest.raises(StatusError) as caught:
        transport.list_page(SERVICES, None, TIMING)
    assert caught.value.code == 401


@pytest.mark.parametrize("inline", [True, False])
def test_a_client_certificate_kubeconfig(kube: KubeAPIServer, services: list[str], tmp_path: Path,
                                         inline: bool) -> None:
    cert, key = kube.client_cert()
    if inline:  # kind's kubeconfig: everything inline
        user = {"client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
                "client-key-data": base64.b64encode(key.read_bytes()).decode()}
        extra = {"certificate-authority-data": base64.b64encode(kube.ca_cert_path.read_bytes()).decode(),
                 "certificate-authority": None}
    else:  # files, relative to the kubeconfig
        (tmp_path / "c.crt").write_bytes(cert.read_bytes())
        (tmp_path / "c.key").write_bytes(key.read_bytes())
        user, extra = {"client-certificate": "c.crt", "client-key": "c.key"}, {}
    check_lists_and_watches(open_transport(kubeconfig(kube, tmp_path / "kc", user, **extra), ""), services)


def test_the_in_cluster_service_account(kube: KubeAPIServer, services: list[str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lean-sa-{uuid.uuid4().hex[:6]}"
    with kube.api_client() as api:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account("default", client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
        rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=name),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="system:node-proxier"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name=name, namespace="default")]))
        token = core.create_namespaced_service_account_token(
            name, "default", client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
        ).status.token
        try:
            (tmp_path / "token").write_text("stale")
            (tmp_path / "ca.crt").write_bytes(kube.ca_cert_path.read_bytes())
            monkeypatch.setattr(kube_config, "SERVICE_ACCOUNT_DIR", str(tmp_path))
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
            transport = open_transport("", "")
            with pytest.raises(StatusError, match="401"):
                transport.list_page(SERVICES, None, TIMING)
            (tmp_path / "token").write_text(token)  # rotated: read again at the next request
            check_lists_and_watches(transport, services)
            # --master with the pod's service account (the DaemonSet's way): the same credentials
            check_lists_and_watches(open_transport("", f"127.0.0.1:{kube.port}"), services)
        finally:
            rbac.delete_cluster_role_binding(name)
            core.delete_namespaced_service_account(name, "default")


def test_an_exec_plugin_runs_once_until_a_401(kube: KubeAPIServer, services: list[str], tmp_path: Path) -> None:
    script, count = tmp_path / "plugin.py", tmp_path / "count"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(count)!r}, 'a').write('x')\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['spec']['cluster']['server'].startswith('https://')\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',\n"
        "                  'status': {'token': os.environ['TOKEN']}}))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin.py",
                     "env": [{"name": "TOKEN", "value": kube.token}], "provideClusterInfo": True,
                     "interactiveMode": "Never"}}
    transport = open_transport(kubeconfig(kube, tmp_path / "kc", user), "")
    check_lists_and_watches(transport, services)
    assert count.read_text() == "x"  # one run for every request so far
    assert isinstance(transport, HttpTransport)
    transport.connection.auth.rejected()  # as after a 401
    transport.list_page(SERVICES, None, TIMING)
    transport.close()
    assert count.read_text() == "xx"


def test_tls_server_name(kube: KubeAPIServer, services: list[str], tmp_path: Path) -> None:
    # The serving certificate names 127.0.0.1 and localhost: dial 127.0.0.1, check the name.
    good = open_transport(kubeconfig(kube, tmp_path / "a", {"token": kube.token}, **{"tls-server-name": "localhost"}), "")
    check_lists_and_watches(good, services)
    bad = open_transport(kubeconfig(kube, tmp_path / "b", {"token": kube.token}, **{"tls-server-name": "elsewhere"}), "")
    with pytest.raises(ssl.SSLCertVerificationError):
        bad.list_page(SERVICES, None, TIMING)
    bad.close()


def test_interrupt_unblocks_a_watch(kube: KubeAPIServer, tmp_path: Path) -> None:
    transport = open_transport(kubeconfig(kube, tmp_path / "kc", {"token": kube.token}), "")
    rv = transport.list_page(SERVICES, None, TIMING)["metadata"]["resourceVersion"]
    done = threading.Event()

    def watch() -> None:
        try:
            for _ in transport.watch(SERVICES, rv, WatchTiming(silence_timeout=60), 60):
                pass
        except (OSError, http.client.HTTPException):  # a shut socket may also raise: transient to the loop
            pass
        done.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert not done.wait(1.0)  # blocked on the open watch
    transport.interrupt()
    assert done.wait(5.0), "interrupt() did not end the watch"
    thread.join(5)
    transport.close()
