"""Fixtures of the realapi tier: the binaries, one control plane per module, clients.

The binaries come from build-binaries.sh (cached outside the repo, a no-op
once built). If they cannot be built the tier skips, except under CI=true,
where it fails (tests.conftest.skip_or_fail).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import skip_or_fail
from tests.realapi.kube import KubeAPIServer, build_binaries


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """Directory holding kube-apiserver and etcd (built on first use)."""
    try:
        return build_binaries()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        skip_or_fail(f"cannot build kube-apiserver/etcd with tests/realapi/build-binaries.sh: {exc}")
        raise  # unreachable: skip_or_fail always raises


@pytest.fixture(scope="module")
def kube(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """A running etcd + kube-apiserver shared by the tests of one module."""
    with KubeAPIServer(bin_dir, tmp_path_factory.mktemp("realapi")) as server:
        yield server


@pytest.fixture
def api(kube: KubeAPIServer) -> Iterator[client.ApiClient]:
    """An admin ApiClient for `kube`, closed after the test."""
    with kube.api_client() as api_client:
        yield api_client
