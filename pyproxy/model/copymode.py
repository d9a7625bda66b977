"""How one direction of a TCP pair moves its bytes: userspace copy or `os.splice`.

The splice relay (`dataplane/splice.py`) asks this module after every read; nothing here
touches a socket.

Theory of operation:
- Copying (`recv` into one shared buffer, then `send`) costs two syscalls and no pipe: the
  cheapest way to move a small message. Splicing (socket -> pipe -> socket) moves up to a
  pipe's worth per call without touching the bytes, but costs a pipe pair and two syscalls
  per round even for a few bytes: it pays off only for bulk.
- So a direction starts in copy mode and counts its *bulk streak*: the bytes of consecutive
  reads that were each at least `bulk_read` long (a read shorter than that ends the streak;
  request/response traffic never builds one, however long the connection lives). When the
  streak reaches `splice_after`, the direction moves to splice.
- In splice mode it counts *small rounds*: consecutive splices that moved less than
  `bulk_read`. After `copy_after` of them (the flow has turned into small messages again) it
  moves back to copy, once its pipe is empty (the relay's part: bytes stay in order).
- `splice_after == 0` splices from the first byte and never goes back; a negative
  `splice_after` never splices.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLICE_NOW = -1  # `copy_read`'s answer: move this direction to splice


@dataclass(frozen=True, slots=True)
class CopyPolicy:
    splice_after: int = 65536  # bytes of bulk reads in a row before splicing (0: at once; < 0: never)
    bulk_read: int = 16384  # a read (or splice round) at least this long counts as bulk
    copy_after: int = 4  # small splice rounds in a row before copying again

    def __post_init__(self) -> None:
        if self.bulk_read <= 0:
            raise ValueError(f"copy policy: bulk_read must be positive, not {self.bulk_read}")
        if self.copy_after <= 0:
            raise ValueError(f"copy policy: copy_after must be positive, not {self.copy_after}")

    @property
    def splice_first(self) -> bool:
        """Splice from the first byte (and stay spliced)."""
        return self.splice_after == 0

    def copy_read(self, streak: int, n: int) -> int:
        """After a copy-mode read of `n` bytes with bulk streak `streak`: the new streak,
        or SPLICE_NOW."""
        if self.splice_after < 0:
            return 0
        if n < self.bulk_read:
            return 0
        streak += n
        return SPLICE_NOW if streak >= self.splice_after else streak

    def splice_round(self, small: int, n: int) -> int:
        """After a splice round that moved `n` bytes with `small` small rounds in a row
        before it: the new count; reaching `copy_after` means: back to copy."""
        if self.splice_after == 0 or n >= self.bulk_read:
            return 0
        return small + 1

    def back_to_copy(self, small: int) -> bool:
        return small >= self.copy_after
