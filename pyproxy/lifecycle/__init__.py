"""Restarts, upgrades and crashes: how a pyproxy process hands its node to the next one.

Theory of operation:
- `channel.py`: framed messages (kind + JSON body + file descriptors over SCM_RIGHTS) on a
  unix stream socket; `handover.py`: the versioned sequence of those messages between the
  running process and its successor (the protocol is written down there); `state.py`: the
  sync state and affinity pins as JSON, with ages instead of clock readings;
  `snapshot.py`: the same state on disk, rewritten atomically every few seconds, for a
  process started after a crash. `connections.py` (optional, the `move` work) moves
  established connections; without it they drain in the old process.
- No gap for new connections: the successor receives the listening sockets themselves,
  so there is one accept queue throughout; it serves before the old one stops accepting.
  A SO_REUSEPORT group was the alternative and was rejected: a listener leaving a group
  resets the connections still in its own accept queue (unless the per-netns
  net.ipv4.tcp_migrate_req is set, which a DaemonSet cannot assume), TPROXY's lookup picks
  any member by hash, and `--workers N` already uses the group's indices for its
  client-address steering, which a second set of members would renumber.
- Stopped with no successor (SIGTERM): the process serves on, follows the API and answers
  /healthz truthfully until a successor takes over or `drainTimeout` passes; only then does
  it stop accepting and cut what is left (a successor refused for its version makes it
  release the listeners at once and drain as before: it first refuses new handshakes,
  accepts what is queued, then closes, so nothing queued is reset; dataplane/letgo.py).
- Crash (`kill -9`) of the serving process: its supervisor (`master.py`) holds the
  listeners, so new connections and datagrams wait in the kernel's queues; it starts a warm
  standby at once, which restores the sync state and affinity from the snapshot, rewrites
  the rules in one transaction (never flushing them), and serves what waited. A crash of
  the supervisor itself (the container killed) is the old crash: the next pyproxy binds
  before its imports and serves once its table is built.
"""
