"""Loading API server connection settings without the `kubernetes` package (sources/kube_config.py).

The real handshakes (client certificates, service-account tokens, exec plugins, a
tls-server-name) are tested against a real kube-apiserver in tests/realapi/test_lean_client.py;
here: which file, context, cluster and user win, and what a bad kubeconfig says.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pyproxy.sources import kube_config
from pyproxy.sources.kube_config import ConfigProblem, load


def write(path: Path, context: str | None, clusters: dict[str, Any], users: dict[str, Any],
          contexts: dict[str, tuple[str, str]]) -> str:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": n, "cluster": c} for n, c in clusters.items()],
        "users": [{"name": n, "user": u} for n, u in users.items()],
        "contexts": [{"name": n, "context": {"cluster": c, "user": u}} for n, (c, u) in contexts.items()],
    }
    if context is not None:
        doc["current-context"] = context
    path.write_text(json.dumps(doc))
    return str(path)


def test_token_and_relative_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub" / "kc", "c", {"k": {"server": "https://10.0.0.1:6443", "certificate-authority": "ca.crt"}},
                 {"u": {"token": "secret", "client-certificate": "/abs/c.crt", "client-key": "c.key"}},
                 {"c": ("k", "u")})
    connection = load(path, "")
    assert connection is not None
    assert connection.server == "https://10.0.0.1:6443" and connection.address == ("10.0.0.1", 6443, True)
    assert connection.tls.ca_file == str(tmp_path / "sub" / "ca.crt")
    assert connection.tls.cert_file == "/abs/c.crt" and connection.tls.key_file == str(tmp_path / "sub" / "c.key")
    assert connection.auth.header() == "Bearer secret"


def test_master_overrides_the_server(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", "c", {"k": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}},
                 {"u": {"token": "secret"}}, {"c": ("k", "u")})
    connection = load(path, "192.168.56.2:6443")
    assert connection is not None and connection.server == "https://192.168.56.2:6443"
    assert connection.tls.insecure and connection.context().verify_mode.name == "CERT_NONE"


def test_files_merge_first_wins(tmp_path: Path) -> None:
    first = write(tmp_path / "a", None, {"k": {"server": "https://first:1"}}, {"u": {"token": "one"}}, {"c": ("k", "u")})
    second = write(tmp_path / "b", "c", {"k": {"server": "https://second:2"}, "k2": {"server": "https://other:3"}},
                   {"u": {"token": "two"}}, {"c": ("k2", "u")})
    connection = load(f"{first}:{tmp_path / 'missing'}:{second}", "")
    # current-context from the second file; context c, cluster k and user u from the first
    assert connection is not None and connection.server == "https://first:1"
    assert connection.auth.header() == "Bearer one"


def test_inline_data_basic_auth_and_token_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    ca = b"-----BEGIN CERTIFICATE-----\n"
    path = write(tmp_path / "kc", "c", {"k": {"server": "http://h", "certificate-authority-data": base64.b64encode(ca).decode()}},
                 {"u": {"tokenFile": "tok"}, "b": {"username": "me", "password": "pw"}},
                 {"c": ("k", "u"), "d": ("k", "b")})
    connection = load(path, "")
    assert connection is not None and connection.tls.ca_data == ca and connection.address == ("h", 80, False)
    assert connection.auth.header() == "Bearer from-file"
    (tmp_path / "tok").write_text("rotated")
    assert connection.auth.header() == "Bearer rotated"  # read at every request
    doc = json.loads((tmp_path / "kc").read_text())
    doc["current-context"] = "d"
    (tmp_path / "kc").write_text(json.dumps(doc))
    connection = load(path, "")
    assert connection is not None and connection.auth.header() == "Basic " + base64.b64encode(b"me:pw").decode()


def test_an_auth_provider_user_is_left_to_the_kubernetes_client(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", "c", {"k": {"server": "https://h"}}, {"u": {"auth-provider": {"name": "oidc"}}},
                 {"c": ("k", "u")})
    assert load(path, "") is None


def test_an_exec_plugin_is_run_until_it_expires(tmp_path: Path) -> None:
    script = tmp_path / "plugin"
    script.write_text(f"#!{sys.executable}\nimport json, os\n"
                      "open(os.environ['COUNT'], 'a').write('x')\n"
                      "print(json.dumps({'status': {'token': 't', 'expirationTimestamp': os.environ['EXP']}}))\n")
    script.chmod(0o700)
    count = tmp_path / "count"
    for expiry, runs in (("2999-01-01T00:00:00Z", "x"), ("2000-01-01T00:00:00Z", "xx")):
        count.write_text("")
        user = {"exec": {"command": str(script), "env": [{"name": "COUNT", "value": str(count)},
                                                          {"name": "EXP", "value": expiry}]}}
        connection = load(write(tmp_path / "kc", "c", {"k": {"server": "https://h"}}, {"u": user}, {"c": ("k", "u")}), "")
        assert connection is not None
        assert connection.auth.header() == "Bearer t" and connection.auth.header() == "Bearer t"
        assert count.read_text() == runs  # an expired credential is fetched again


def test_a_failing_exec_plugin_says_why(tmp_path: Path) -> None:
    user = {"exec": {"command": "/bin/sh", "args": ["-c", "echo no login >&2; exit 3"]}}
    connection = load(write(tmp_path / "kc", "c", {"k": {"server": "https://h"}}, {"u": user}, {"c": ("k", "u")}), "")
    assert connection is not None
    with pytest.raises(ConfigProblem, match="exited 3: no login"):
        connection.auth.header()


@pytest.mark.parametrize(("doc", "message"), [
    ("[]", "not a kubeconfig"),
    ("clusters: [", "not YAML"),
    ("{}", "current-context None"),
    ('{"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "x"}}]}', "no known cluster"),
    ('{"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}], '
     '"clusters": [{"name": "k", "cluster": {}}]}', "has no server"),
])
def test_bad_kubeconfigs(tmp_path: Path, doc: str, message: str) -> None:
    (tmp_path / "kc").write_text(doc)
    with pytest.raises(ConfigProblem, match=message):
        load(str(tmp_path / "kc"), "")


def test_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_config, "SERVICE_ACCOUNT_DIR", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigProblem, match="not in a cluster"):
        load("", "")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigProblem, match="ca.crt is missing"):
        load("", "")
    (tmp_path / "ca.crt").write_text("")
    (tmp_path / "token").write_text("sa")
    connection = load("", "")
    assert connection is not None and connection.address == ("fd00::1", 443, True)
    assert connection.auth.header() == "Bearer sa"
    connection = load("", "10.0.0.9:6443")  # --master: the service account's credentials, that server
    assert connection is not None and connection.server == "https://10.0.0.9:6443"
    assert connection.auth.header() == "Bearer sa"
