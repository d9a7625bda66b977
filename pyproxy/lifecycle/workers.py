"""`--workers N`: does a running group hand over to a new one? (The data plane's side is
dataplane/workers.py; forking and supervising the workers is master.py's, which asks this
before it makes the N listeners of one reuseport group.)

Rules kept here:
- A probe hello on worker 0's hand-over socket: a group that answers hands over (each new
  worker then takes its socket over from its counterpart, so the steering stays).
- A group that refuses (another protocol version) is waited for until it has gone (it
  releases on SIGTERM).
"""

from __future__ import annotations

import time

from pyproxy.config import ProxyConfig, node_name_of
from pyproxy.lifecycle.channel import Channel
from pyproxy.lifecycle.handover import identity_of, socket_path, take_over


def predecessor_hands_over(config: ProxyConfig) -> bool:
    """Does a running group hand over to this one? A group that refuses (another protocol
    version) is waited for until it has gone (it releases on SIGTERM)."""
    path = socket_path(config.lifecycle.stateDir, 0)
    mine = identity_of(config, node_name_of(config), 0, config.dataplane.workers, probe=True)
    outcome = take_over(path, mine, config.lifecycle.handOverTimeout)
    if outcome.refused is None:
        return outcome.found
    while True:  # bounded by the running group's own drain bound
        try:
            Channel.connect(path, 1.0).close()
        except OSError:
            return False
        time.sleep(0.2)
