"""ClientIP session affinity and the fresh pick, per service port (SPEC.md §4).

Rules kept here:
- The key is the client's IP, never its port.
- Expiry slides: every new connection assigned to an endpoint, by affinity or by a fresh
  pick, refreshes its entry. Nothing else does (bytes on open connections don't reach here).
- An entry is stale once `timeout` seconds pass without a new connection; a stale entry
  is a miss and the next pick is fresh.
- The table is an LRU bounded by `capacity`: the least recently used client is evicted,
  which only costs that client its stickiness. Stale entries are dropped a few at a time
  as new ones are recorded, so they neither linger nor count as evictions.
- An entry whose endpoint leaves the usable set is dropped at once.
- Time is passed in (`now`, seconds on a monotonic clock); nothing here reads a clock.
- `restore` puts back a pin handed over by a predecessor (pyproxy/lifecycle/state.py) with
  its own last use, so a restart neither refreshes nor shortens any client's expiry.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pyproxy.model.endpoints import Endpoint

Address = tuple[str, int]


@dataclass
class AffinityStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AffinityTable:
    """client IP -> (endpoint address, last use), least recently used first."""

    def __init__(self, capacity: int, timeout: float) -> None:
        if capacity < 1:
            raise ValueError("affinity capacity must be at least 1")
        self.capacity = capacity
        self.timeout = timeout
        self.stats = AffinityStats()
        self._entries: OrderedDict[str, tuple[Address, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[str, Address, float]]:
        """(client IP, endpoint, last use) of every entry, stale ones included (read-only copy)."""
        return [(ip, address, last_used) for ip, (address, last_used) in self._entries.items()]

    def lookup(self, client_ip: str, now: float) -> Address | None:
        """The endpoint this client is pinned to, if the pin is still fresh."""
        entry = self._entries.get(client_ip)
        if entry is None:
            return None
        address, last_used = entry
        if now - last_used > self.timeout:
            del self._entries[client_ip]
            return None
        return address

    def lookup_entry(self, client_ip: str) -> tuple[Address, float] | None:
        """(endpoint, last use) of a client's entry, stale or not, without touching it."""
        return self._entries.get(client_ip)

    def restore(self, client_ip: str, address: Address, last_used: float) -> None:
        """Put back a pin handed over by a predecessor, with its own last use (no sliding:
        no connection was made). Bounded like `record`."""
        self._entries[client_ip] = (address, last_used)
        self._entries.move_to_end(client_ip)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def record(self, client_ip: str, address: Address, now: float) -> None:
        """Pin (or re-pin) a client and slide its expiry."""
        self._entries[client_ip] = (address, now)
        self._entries.move_to_end(client_ip)
        self.expire(now, limit=2)  # amortized sweep: faster than clients arrive, O(1) per record
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def retain(self, usable: Collection[Address]) -> None:
        """Drop every entry whose endpoint is no longer usable."""
        gone = [ip for ip, (address, _) in self._entries.items() if address not in usable]
        for ip in gone:
            del self._entries[ip]

    def expire(self, now: float, limit: int = 1000) -> int:
        """Drop up to `limit` stale entries from the old end; returns how many went."""
        dropped = 0
        while self._entries and dropped < limit:
            ip, (_, last_used) = next(iter(self._entries.items()))
            if now - last_used <= self.timeout:
                break
            del self._entries[ip]
            dropped += 1
        return dropped

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class Balancer:
    """Chooses the endpoint for each new connection to one service port.

    `consistent_seed` switches the fresh pick from uniform random to rendezvous hashing of
    the client IP over the canonically sorted endpoints, so every node makes the same first
    pick for a client without sharing state (SPEC.md §4, beyond).
    """

    capacity: int
    rng: random.Random = field(default_factory=random.Random)
    consistent_seed: str | None = None
    affinity: AffinityTable | None = None

    def configure(self, affinity_timeout: int | None, usable: Collection[Address]) -> None:
        """Apply the Service's current affinity settings and endpoint set (takes effect at once)."""
        if affinity_timeout is None:
            self.affinity = None
            return
        if self.affinity is None:
            self.affinity = AffinityTable(self.capacity, affinity_timeout)
        self.affinity.timeout = affinity_timeout
        self.affinity.retain(usable)

    @property
    def uniform(self) -> bool:
        """Whether `pick` is a uniform random draw over its candidates that reads and records
        nothing (no affinity): then a relay that holds the candidates may draw for itself,
        as the compiled engine does (dataplane/engine.py), until the port's route changes."""
        return self.affinity is None

    def pick(
        self,
        client_ip: str,
        candidates: Sequence[Endpoint],
        now: float,
        exclude: Collection[Address] = (),
    ) -> Endpoint | None:
        """The endpoint for a new connection from `client_ip`, or None if none is left."""
        usable = [e for e in candidates if e.address not in exclude] if exclude else list(candidates)
        if not usable:
            return None
        chosen = self._pinned(client_ip, usable, now)
        if chosen is None:
            chosen = self._fresh(client_ip, usable)
        if self.affinity is not None:
            self.affinity.record(client_ip, chosen.address, now)
        return chosen

    def _pinned(self, client_ip: str, usable: list[Endpoint], now: float) -> Endpoint | None:
        if self.affinity is None:
            return None
        address = self.affinity.lookup(client_ip, now)
        for endpoint in usable:
            if endpoint.address == address:
                self.affinity.stats.hits += 1
                return endpoint
        self.affinity.stats.misses += 1
        return None

    def _fresh(self, client_ip: str, usable: list[Endpoint]) -> Endpoint:
        if self.consistent_seed is None or self.affinity is None:
            return usable[self.rng.randrange(len(usable))]
        return max(sorted(usable), key=lambda e: _rendezvous(self.consistent_seed or "", client_ip, e))


def _rendezvous(seed: str, client_ip: str, endpoint: Endpoint) -> bytes:
    text = f"{seed}|{client_ip}|{endpoint.ip}:{endpoint.port}".encode()
    return hashlib.blake2b(text, digest_size=8).digest()
