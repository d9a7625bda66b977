"""Fixtures of the kind tier: one real two-node kind cluster per pod network, pyproxy in it.

The cluster is made exactly as the README tells a user (`cmd/kind up --no-pyproxy`, then
`kubectl apply -f daemonset.yaml`), once per pod network in `cluster.CNIS`, and deleted after
that network's tests; the docker daemon is stopped at the end of the session. Building the
toolchain the first time takes about 30 minutes (then it is cached in /var/cache/pyproxy).
Outside CI the tier skips with the reason when it cannot run; under CI=true it fails.
Select it alone with `-m kind`, or leave it out with `-m "not kind"`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import privileged_reason, skip_or_fail
from tests.kind import __main__ as kind_cli
from tests.kind import cluster, dockerd, images, scenarios


@pytest.hookimpl(trylast=True)  # after pytest has grouped the items by their cluster
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tier `kind`; per cluster, the e2e suite last: it lays the nodes out for its
    specs (the control plane schedulable, zones), which the tier's own tests do not expect."""
    slots = [i for i, item in enumerate(items) if "tests/kind/" in str(item.fspath)]
    for i in slots:
        items[i].add_marker(pytest.mark.kind)

    def order(item: pytest.Item) -> tuple[int, bool]:
        callspec = getattr(item, "callspec", None)
        cni = callspec.params.get("kind") if callspec else None
        return (cluster.CNIS.index(cni) if cni in cluster.CNIS else -1, item.path.name == "test_e2e.py")

    ordered = sorted((items[i] for i in slots), key=order)
    for i, item in zip(slots, ordered):
        items[i] = item


def _reason() -> str | None:
    reason = privileged_reason()
    if reason:
        return reason
    for tool in ("dockerd", "debootstrap", "nsenter", "go", "gcc"):
        if shutil.which(tool) is None and not (tool == "go" and shutil.which("/usr/local/go/bin/go")):
            return f"needs '{tool}' (cmd/kind installs the Debian packages; Go and gcc come with the machine)"
    return None


@pytest.fixture(scope="session")
def kind_daemon() -> Iterator[dockerd.Daemon]:
    reason = _reason()
    if reason:
        skip_or_fail(reason)
    try:
        daemon = dockerd.start()
        kind_cli.build_images(daemon)
    except (dockerd.DockerError, images.BuildError, subprocess.CalledProcessError, OSError) as exc:
        dockerd.stop()
        skip_or_fail(f"kind toolchain could not be built or started: {exc}")
        raise
    try:
        yield daemon
    finally:
        try:
            cluster.delete(daemon)
        finally:
            dockerd.stop()


@pytest.fixture(scope="session", params=cluster.CNIS)
def kind(request: pytest.FixtureRequest, kind_daemon: dockerd.Daemon) -> Iterator[cluster.Cluster]:
    """The cluster on one pod network, with pyproxy applied from daemonset.yaml and Ready."""
    cni: str = request.param
    print(f"\n[kind] cluster on the {cni} pod network", file=sys.stderr)
    c = cluster.create(kind_daemon, cni)
    try:
        cluster.load(kind_daemon, images.PYPROXY_IMAGE)
        kind_cli.apply_pyproxy(c)
        scenarios.apply_all(c)
        yield c
    finally:
        _dump_on_failure(c, request)
        cluster.delete(kind_daemon)


def _dump_on_failure(c: cluster.Cluster, request: pytest.FixtureRequest) -> None:
    """pyproxy's logs from every node into the test output, when a test of this cluster failed."""
    if request.session.testsfailed:
        logs = c.kubectl("-n", "kube-system", "logs", "-l", "app.kubernetes.io/name=pyproxy",
                         "--tail=60", "--prefix", check=False)
        print(f"\n[kind {c.cni}] pyproxy logs:\n{logs.stdout}{logs.stderr}", file=sys.stderr)
