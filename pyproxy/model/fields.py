"""Typed reads of API-shaped values: the only way `objects.py` looks into a document.

Rules kept here:
- A `Field` is a value plus where it sits: the object's kind and key, and the field path
  (`spec.ports[1].protocol`). Every accessor returns the type it asks for, or raises
  `InvalidObject` naming the object, the path and the reason. Nothing else is raised,
  whatever the value is: any YAML or JSON type (sets, dates, bytes, huge integers), any
  size, any depth.
- Missing (absent or null) is not wrong: each accessor says what missing means (a default,
  an empty mapping or list, or None).
- Sizes are bounded: a string longer than `MAX_STRING`, or a list or mapping with more
  than `MAX_ITEMS` entries, is a rejection, so no later step iterates an unbounded value.
- A value quoted in a reason is described, never dumped: at most `QUOTE` characters of a
  string, and only the type and size of a container (repr of an alias-expanded structure
  could be gigabytes; repr of a huge int raises).
- Accessors only go as deep as the fields they read: depth elsewhere costs nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

MAX_STRING = 4096
MAX_NAME = 253  # metadata.name / namespace (DNS subdomain), label values are shorter still
MAX_ITEMS = 10000
QUOTE = 40


class InvalidObject(ValueError):
    """A Service, EndpointSlice or Node (or a part of one) that cannot be used, and why."""

    def __init__(self, kind: str, key: str, reason: str) -> None:
        super().__init__(f"{kind} {key}: {reason}")
        self.kind = kind
        self.key = key
        self.reason = reason


def describe(value: Any) -> str:
    """A short, safe rendering of any value for a reason text."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, str):
        text = repr(value[:QUOTE])
        return text if len(value) <= QUOTE else f"{text[:-1]}...{text[-1]} ({len(value)} characters)"
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} entries"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


class Field:
    """One value of an object under parse, with its path (see the module doc)."""

    __slots__ = ("value", "kind", "key", "path")

    def __init__(self, value: Any, kind: str, key: str, path: str = "") -> None:
        self.value = value
        self.kind = kind
        self.key = key
        self.path = path

    def error(self, reason: str) -> InvalidObject:
        where = f"{self.path}: " if self.path else ""
        return InvalidObject(self.kind, self.key, f"{where}{reason}")

    def wrong(self, expected: str) -> InvalidObject:
        return self.error(f"expected {expected}, got {describe(self.value)}")

    @property
    def missing(self) -> bool:
        return self.value is None

    # containers

    def mapping(self) -> Mapping[Any, Any]:
        """The value as a mapping; missing is empty."""
        if self.value is None:
            return {}
        if not isinstance(self.value, Mapping):
            raise self.wrong("a mapping")
        if len(self.value) > MAX_ITEMS:
            raise self.error(f"more than {MAX_ITEMS} entries")
        return self.value

    def get(self, name: str) -> Field:
        """The field `name` of this mapping (missing if absent)."""
        value = self.mapping().get(name)
        return Field(value, self.kind, self.key, f"{self.path}.{name}" if self.path else name)

    def items(self, limit: int = MAX_ITEMS) -> list[Field]:
        """The value as a list of fields; missing is empty."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.wrong("a list")
        if len(self.value) > limit:
            raise self.error(f"more than {limit} items ({len(self.value)})")
        return [Field(v, self.kind, self.key, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def string_map(self) -> Iterator[tuple[str, Field]]:
        """(key, field) for the string keys of this mapping (labels, annotations)."""
        for name, value in self.mapping().items():
            if isinstance(name, str) and len(name) <= MAX_STRING:
                yield name, Field(value, self.kind, self.key, f"{self.path}[{name[:QUOTE]!r}]")

    # scalars

    def string(self, default: str | None = None, limit: int = MAX_STRING) -> str:
        """The value as a string; missing (or empty) is `default`, or an error without one."""
        if self.value is None or self.value == "":
            if default is None:
                raise self.error("is required")
            return default
        if not isinstance(self.value, str):
            raise self.wrong("a string")
        if len(self.value) > limit:
            raise self.error(f"longer than {limit} characters ({len(self.value)})")
        return self.value

    def optional_string(self, limit: int = MAX_STRING) -> str | None:
        if self.value is None or self.value == "":
            return None
        return self.string(limit=limit)

    def choice(self, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(default)
        if value not in allowed:
            raise self.error(f"{describe(value)} is not one of {', '.join(allowed)}")
        return value

    def integer(self, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(f"{describe(value)} is not a number in {low}..{high}")
        return value

    def port(self) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(f"{describe(value)} is not a port number (1-65535)")
        return value

    def optional_bool(self) -> bool | None:
        if self.value is None:
            return None
        if not isinstance(self.value, bool):
            raise self.error(f"{describe(self.value)} is not true or false")
        return self.value

    def ip(self) -> str:
        """An IPv4 or IPv6 address in canonical form."""
        text = self.string(limit=64)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.error(f"{describe(text)} is not an IP address") from None

    def cidr(self) -> str:
        """An IPv4 or IPv6 network in canonical form. Read as kube-proxy reads one
        (ParseCIDRSloppy): surrounding spaces, host bits and leading zeros in IPv4 are
        accepted, so `203.0.113.000/025` is 203.0.113.0/25."""
        text = self.string(limit=64).strip()
        try:
            return str(ipaddress.ip_network(_sloppy_ipv4(text), strict=False))
        except ValueError:
            raise self.error(f"{describe(text)} is not a CIDR") from None

    def int_or_name(self, default: int) -> int | str:
        """A number or a name (targetPort); missing is `default`."""
        if self.value is None:
            return default
        if isinstance(self.value, str):
            return self.string(limit=MAX_NAME)
        return self.port()


def _sloppy_ipv4(text: str) -> str:
    """`010.1.2.3/08` -> `10.1.2.3/8`; anything else is returned as it is."""
    address, slash, prefix = text.partition("/")
    octets = address.split(".")
    if not slash or len(octets) != 4 or not all(o.isdigit() and len(o) <= 3 for o in octets + [prefix]):
        return text
    return ".".join(str(int(o)) for o in octets) + f"/{int(prefix)}"


def is_ipv6(address: str) -> bool:
    return ":" in address
