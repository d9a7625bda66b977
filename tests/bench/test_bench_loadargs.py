"""Argument parsing of the load tool and source-address handling."""

from __future__ import annotations

import pytest

from bench.loadtool.addrs import parse_source_addrs, share, split_evenly
from bench.loadtool.loadargs import SpecError, parse, parse_target


def test_defaults_per_mode() -> None:
    spec = parse(["crr", "--target", "10.0.0.1:80"])
    assert spec.target == ("10.0.0.1", 80)
    assert (spec.conns, spec.procs, spec.duration, spec.sources) == (16, 1, 5.0, ())
    assert parse(["idle", "--target", "h:1"]).conns == 1000


def test_everything_given() -> None:
    spec = parse(["latency", "--target", "127.0.0.1:9", "--rate", "2500", "--op", "rr", "--procs", "2",
                  "--conns", "8", "--source-addrs", "10.1.0.0/30,10.2.0.9", "--duration", "1.5",
                  "--max-ops", "100", "--json", "--no-progress"])
    assert spec.rate == 2500 and spec.op == "rr" and spec.procs == 2 and spec.max_ops == 100
    assert spec.sources == ("10.1.0.1", "10.1.0.2", "10.2.0.9")
    assert spec.json and spec.progress is False
    assert spec.hard_deadline_s > spec.duration


@pytest.mark.parametrize("argv", [
    ["rr", "--target", "nohost"],
    ["rr", "--target", "h:0"],
    ["rr", "--target", "h:1", "--duration", "0"],
    ["rr", "--target", "h:1", "--conns", "1", "--procs", "2"],
    ["rr", "--target", "h:1", "--req-size", "0"],
    ["rr", "--target", "h:1", "--source-addrs", "10.0.0.300"],
    ["latency", "--target", "h:1", "--rate", "-5"],
])
def test_bad_values_raise_spec_error(argv: list[str]) -> None:
    with pytest.raises(SpecError):
        parse(argv)


def test_unknown_mode_exits() -> None:
    with pytest.raises(SystemExit):
        parse(["bogus", "--target", "h:1"])


def test_parse_target() -> None:
    assert parse_target("10.96.0.10:80") == ("10.96.0.10", 80)
    with pytest.raises(SpecError):
        parse_target(":80")


def test_source_addrs_list_cidr_dedup_and_small_prefixes() -> None:
    assert parse_source_addrs("") == ()
    assert parse_source_addrs("10.0.0.1, 10.0.0.1,10.0.0.2") == ("10.0.0.1", "10.0.0.2")
    assert parse_source_addrs("10.0.0.0/31") == ("10.0.0.0", "10.0.0.1")
    assert len(parse_source_addrs("10.0.0.0/24")) == 254


def test_share_is_fair_and_covers_everything() -> None:
    addrs = tuple(f"10.0.0.{i}" for i in range(1, 8))
    parts = [share(addrs, i, 3) for i in range(3)]
    assert sorted(a for p in parts for a in p) == sorted(addrs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert share(addrs[:1], 1, 2) == addrs[:1]  # fewer addresses than processes: all share them


def test_split_evenly() -> None:
    assert [split_evenly(10, i, 3) for i in range(3)] == [4, 3, 3]
    assert sum(split_evenly(7, i, 4) for i in range(4)) == 7
