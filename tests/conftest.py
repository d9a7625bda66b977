"""Shared test configuration: the tiers, and the rule that CI never skips a tier."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing capability skips with its reason; in CI it fails the run."""
    if IN_CI:
        pytest.fail(f"required tier cannot run in CI: {reason}")
    pytest.skip(reason)


def privileged_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, TPROXY)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (apt-get install iproute2 nftables)"
    return None


@contextmanager
def private_netns(name: str) -> Iterator[str]:
    """A network namespace of the caller's own, `lo` up, deleted on the way out (on failure too)."""
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


def run_in_private_netns(prefix: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Python `script` run in a private namespace of its own (skipped, or failed in CI, without
    the privileges); its output captured. The namespace is deleted afterwards."""
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=timeout, cwd=os.getcwd())
