"""The hardening driver's verdicts (tests/hardening/scenarios.py's `judge`), on plain values:
what each kind of case must deliver, so a relay that loses, reorders or makes up bytes, or
leaves a stream hanging, fails the driver. And cases replay from their seed."""

from __future__ import annotations

from tests.hardening.actor import Outcome
from tests.hardening.scenarios import SCENARIOS, Case, judge, make_case

TIMEOUTS = (1.0, 0.5, 1.0, 2.0)


def case(kind: str, up: bytes = b"", down: bytes = b"", **extra: object) -> Case:
    return Case(1, "test", "plain", kind, [], [], up=up, down=down, **extra)  # type: ignore[arg-type]


def ended(got: bytes, how: str = "eof") -> Outcome:
    return Outcome(got=bytearray(got), eof=how == "eof", reset=how == "reset", timed_out=how == "timeout")


def test_full_wants_every_byte_and_clean_ends() -> None:
    c = case("full", up=b"abc", down=b"xyz")
    assert judge(c, ended(b"xyz"), ended(b"abc"), False) is None
    assert judge(c, ended(b"xy"), ended(b"abc"), False) is not None  # a byte lost
    assert judge(c, ended(b"xzy"), ended(b"abc"), False) is not None  # reordered
    assert judge(c, ended(b"xyz", "reset"), ended(b"abc"), False) is not None  # every byte, then a reset
    assert judge(c, ended(b"xyz", "timeout"), ended(b"abc"), False) is not None  # never ended
    assert judge(c, ended(b"xyz"), ended(b"abc", "timeout"), False) is not None


def test_an_unseen_full_case_is_a_refusal_only_where_the_relay_may_refuse() -> None:
    c = case("full", up=b"abc", down=b"xyz")
    assert judge(c, ended(b"", "reset"), None, False) is not None
    assert judge(c, ended(b"", "reset"), None, True) is None
    assert judge(c, ended(b"x", "reset"), None, True) is not None


def test_urgent_bytes_may_be_dropped_or_passed_in_band_but_nothing_else_lost() -> None:
    c = case("urgent", up=b"aabb", down=b"aabb", up_alternatives=(b"aa!bb",), down_alternatives=(b"aa!bb",))
    assert judge(c, ended(b"aabb"), ended(b"aa!bb"), False) is None
    assert judge(c, ended(b"aa"), ended(b"aabb"), False) is not None
    assert judge(c, ended(b"aab!b"), ended(b"aabb"), False) is not None


def test_a_reset_case_wants_prefixes_and_ends() -> None:
    c = case("prefix", up=b"abcdef", down=b"uvwxyz")
    assert judge(c, ended(b"uvw", "reset"), ended(b"abc", "eof"), False) is None
    assert judge(c, ended(b"uvx", "reset"), ended(b"abc", "eof"), False) is not None
    assert judge(c, ended(b"uvw", "timeout"), ended(b"abc", "eof"), False) is not None
    assert judge(c, ended(b"", "reset"), None, False) is not None  # the backend must see it unless the client reset
    c.client.append(("reset", None))
    assert judge(c, Outcome(), None, False) is None


def test_a_refusal_gives_no_byte_and_an_end() -> None:
    c = case("refused")
    assert judge(c, ended(b"", "reset"), None, False) is None
    assert judge(c, ended(b"", "timeout"), None, False) is not None
    assert judge(c, ended(b"", "reset"), ended(b""), False) is not None


def test_cases_replay_from_their_seed_and_number() -> None:
    names = tuple(SCENARIOS)
    a, b = make_case(7, 42, names, TIMEOUTS), make_case(7, 42, names, TIMEOUTS)
    assert (a.scenario, a.service, a.up, a.down, a.client, a.backend) == (
        b.scenario, b.service, b.up, b.down, b.client, b.backend)
    assert {make_case(7, i, names, TIMEOUTS).scenario for i in range(300)} == set(names)
