"""Shared test configuration: the tiers, and the rule that CI never skips a tier."""

from __future__ import annotations

import os
import shutil

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
