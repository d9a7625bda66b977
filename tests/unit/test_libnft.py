"""Choosing how nftables transactions are applied (dataplane/libnft.py); the transactions
themselves are tested through both runners in tests/kernel/test_nft_apply.py."""

from __future__ import annotations

import pytest

from pyproxy.dataplane import libnft
from pyproxy.dataplane.nft import NftRunner


def test_command_mode_runs_the_command() -> None:
    assert type(libnft.open_runner("command")) is NftRunner


def test_library_mode_falls_back_to_the_command_without_the_library(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def missing(name: str = "") -> None:
        raise OSError("libnftables.so.1: cannot open shared object file")

    monkeypatch.setattr(libnft, "load_library", missing)
    assert type(libnft.open_runner("library")) is NftRunner
    assert "running the nft command" in caplog.text


def test_library_mode_uses_the_library_when_it_loads() -> None:
    try:
        libnft.load_library()
    except OSError:
        pytest.skip("no libnftables.so.1 here")
    runner = libnft.open_runner("library")
    assert isinstance(runner, libnft.LibNftRunner)
    runner.close()


def test_the_config_accepts_only_known_modes() -> None:
    from pyproxy.config import ConfigError, load_config

    assert load_config("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\n"
                            "dataplane:\n  nftables: command\n").dataplane.nftables == "command"
    with pytest.raises(ConfigError, match="dataplane.nftables"):
        load_config("apiVersion: pyproxy.io/v1alpha1\nkind: PyProxyConfiguration\ndataplane:\n  nftables: iptables\n")
