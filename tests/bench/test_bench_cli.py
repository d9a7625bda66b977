"""`pyproxy-bench` dispatches to the tools; a load mode alone means the load tool."""

from __future__ import annotations

import pytest

from bench import cli


def test_help_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyproxy-bench TOOL") and "pyproxy-bench run" in out
    assert "main(argv)" not in out  # a description for users, not the module's docstring
    assert all(mode in out for mode in ("stream", "rr", "crr", "latency", "idle", "affinity"))
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2


def test_mode_goes_to_the_load_tool(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crr", "--target", "no-port"]) == 2  # the load tool's own argument check
    assert "--target" in capsys.readouterr().err
    assert cli.main(["load", "crr", "--target", "no-port"]) == 2
