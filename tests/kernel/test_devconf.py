"""Per-interface IPv4 settings over netlink, on the real kernel, in a private namespace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

SCRIPT = """
from pyproxy.dataplane.devconf import IPV4_DEVCONF_SRC_VMARK, set_ipv4_devconf
import subprocess
subprocess.run(["ip", "link", "add", "pp-dc-a", "type", "veth", "peer", "name", "pp-dc-b"], check=True)
set_ipv4_devconf("pp-dc-b", {IPV4_DEVCONF_SRC_VMARK: 1})
print(open("/proc/sys/net/ipv4/conf/pp-dc-b/src_valid_mark").read().strip(),
      open("/proc/sys/net/ipv4/conf/pp-dc-a/src_valid_mark").read().strip())
try:
    set_ipv4_devconf("pp-dc-b", {999: 1})
except OSError as exc:
    print("refused", exc.errno)
"""


def test_src_valid_mark_is_set_on_one_interface_only_and_bad_ids_are_refused() -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    # `unshare -n`: a network namespace of its own that ends with the process
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split("\n")
    assert out[:2] == ["1 0", "refused 22"]
