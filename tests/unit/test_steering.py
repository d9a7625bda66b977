"""The reuseport steering program: its bytes, and the Python twin of its arithmetic."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from pyproxy.dataplane import steering


def test_program_loads_saddr_through_the_network_header_base() -> None:
    code = steering.program(4)
    assert len(code) == 5 * 8
    first = struct.unpack("=HBBI", code[:8])
    assert first == (0x20, 0, 0, (-0x100000 + 12) & 0xFFFFFFFF)  # ld [SKF_NET_OFF + 12]
    mod = struct.unpack("=HBBI", code[24:32])
    assert mod == (0x94, 0, 0, 4)  # alu mod #4
    assert struct.unpack("=HBBI", code[32:]) == (0x16, 0, 0, 0)  # ret a


def test_worker_for_is_stable_in_range_and_spreads_neighbours() -> None:
    clients = [f"10.200.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    for n in (1, 2, 3, 4):
        picks = [steering.worker_for(c, n) for c in clients]
        assert picks == [steering.worker_for(c, n) for c in clients]
        assert set(picks) == set(range(n))
        assert max(Counter(picks).values()) < 1.3 * len(clients) / n


@pytest.mark.parametrize("n", [0, 65])
def test_worker_count_is_bounded(n: int) -> None:
    with pytest.raises(ValueError):
        steering.program(n)
