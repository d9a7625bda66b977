"""`pyproxy --help` names every default a user must otherwise guess, and the subcommands."""

from __future__ import annotations

import pytest

from pyproxy.cli import main


def test_help_shows_defaults_and_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(dataplane.relay): splice, the only one" in out
    assert "(dataplane.workers; default 1)" in out
    assert "pyproxy demo [--only" in out and "pyproxy inspect services|endpoints|affinity|connections" in out


def test_inspect_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: pyproxy inspect") and "-o {table,wide,json}" in out
