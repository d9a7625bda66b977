"""The README's first command: `pyproxy demo` plays the scenarios and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged


def test_demo_shows_the_scenarios_and_cleans_up() -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    result = subprocess.run([sys.executable, "-m", "pyproxy", "demo"], capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    s1 = out.split("== S1")[1].split("== S2")[0]
    tries = re.findall(r"\$ sleep 4; curl http://\S+   # try \d\n    (Host=.*)", s1)
    assert tries and len(tries) == s1.count("sleep 4; curl"), s1  # each try is shown with its answer
    s3 = out.split("== S3")[1].split("== S5")[0]
    assert re.search(r"^\s+100 From=p[abc]$", s3, re.M), s3  # ClientIP: one pod answers all 100
    assert len(re.findall(r"^\s+\d+ From=p[abc]$", s3, re.M)) == 4, s3  # then None: spread over three
    s5 = out.split("== S5")[1].split("== S7")[0]
    local = s5.split("# Local")[1]
    assert "ClientIP=192.168.56.100" in local and "ClientIP=192.168.56.100" not in s5.split("# Local")[0]
    assert re.search(r"^\s+refused \d+\.\d+$", out, re.M), "a Service without endpoints is refused"
    assert "web.svc.test -> 10.1.2.3" in out
    prefix = re.search(r"removed every namespace \((\S+)-\*\)", out).group(1)  # type: ignore[union-attr]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"{prefix}-" not in left, f"the demo left namespaces behind: {left}"
