"""The README's config field list is what `pyproxy --write-config-to -` prints: every field,
in order, with the same default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pyproxy.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([A-Za-z.]+)` \| `([^`]*)` \|")


def readme_fields() -> list[tuple[str, Any]]:
    text = README.read_text()
    table = text.split("| field | default | meaning |", 1)[1].split("\n\n", 1)[0]
    return [(m.group(1), yaml.safe_load(m.group(2))) for line in table.splitlines() if (m := ROW.match(line))]


def printed_fields(capsys: Any) -> list[tuple[str, Any]]:
    assert main(["--write-config-to", "-"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    del doc["apiVersion"], doc["kind"]

    def flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
        if isinstance(value, dict):
            return [item for key, inner in value.items() for item in flatten(f"{prefix}{key}.", inner)]
        return [(prefix.rstrip("."), value)]

    return flatten("", doc)


def test_readme_lists_every_printed_field_with_its_default(capsys: Any) -> None:
    printed = printed_fields(capsys)
    listed = readme_fields()
    missing = [name for name, _ in printed if name not in dict(listed)]
    assert not missing, f"fields printed by --write-config-to but not in the README: {missing}"
    extra = [name for name, _ in listed if name not in dict(printed)]
    assert not extra, f"README lists fields that do not exist: {extra}"
    differ = [(name, dict(listed)[name], value) for name, value in printed if dict(listed)[name] != value]
    assert not differ, f"README default differs from --write-config-to (field, README, printed): {differ}"
    assert [name for name, _ in listed] == [name for name, _ in printed], "README order differs"


def test_durations_and_the_mark_print_as_the_readme_writes_them(capsys: Any) -> None:
    assert main(["--write-config-to", "-"]) == 0
    out = capsys.readouterr().out
    for line in ("  mark: 0x200000\n", "  tcpIdleTimeout: 1h\n", "  tcpHalfCloseTimeout: 5m\n", "minSyncPeriod: 100ms\n"):
        assert line in out
