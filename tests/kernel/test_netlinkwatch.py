"""netlinkwatch.ChangeWatch against the real kernel, in a private network namespace.

The watch must say "changed" at its first call, stay quiet while nothing changes, and say
"changed" after an address, a link or a route is added; the namespace is this test's own
and is removed afterwards.
"""

from __future__ import annotations

import pytest

from tests.conftest import run_in_private_netns

pytestmark = pytest.mark.privileged

SCRIPT = """
import subprocess, sys, time
from pyproxy.dataplane.netlinkwatch import ChangeWatch

def ip(*args):
    subprocess.run(["ip", *args], check=True)

def settled(watch):  # messages are queued when the `ip` command returns; a short bound anyway
    for _ in range(50):
        if watch.changed():
            return True
        time.sleep(0.01)
    return False

watch = ChangeWatch()
assert watch.changed(), "first call"
assert not watch.changed(), "nothing changed"
ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
assert settled(watch), "a link"
ip("link", "set", "d0", "up"); ip("link", "set", "d1", "up")
watch.changed()
ip("addr", "add", "192.0.2.1/24", "dev", "d0")
assert settled(watch), "an address"
assert not watch.changed(), "quiet again"
ip("route", "add", "198.51.100.0/24", "via", "192.0.2.2")
assert settled(watch), "a route"
assert not watch.changed(), "quiet at the end"
watch.close()
print("ok")
"""


def test_the_watch_sees_links_addresses_and_routes() -> None:
    done = run_in_private_netns("pyproxy-nlw", SCRIPT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
