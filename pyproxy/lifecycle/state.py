"""The proxy state that outlives a process: what is handed over and what is snapshotted.

Theory of operation:
- Two parts. The *sync state* is the cluster store (Services, EndpointSlices, the Node):
  with it a successor programs the kernel and serves before its own first list from the
  API server completes. The *affinity state* is every ClientIP pin, per service port:
  (client IP, endpoint ip:port, age in seconds).
- Ages, never clock readings, cross the process boundary: each side reads its own
  monotonic clock, and the receiver re-bases `last use = its now - age`, so the sliding
  expiry goes on exactly where it was. A snapshot on disk also records its wall-clock
  write time, and the age it has been lying there is added on restore.
- Encoding is a plain JSON tree built from the model's frozen dataclasses (`encode_obj`,
  `decode_obj` by their type hints; enums by value; a field with a default may be absent,
  so the state of the release before one that added it still decodes): nothing is pickled, so a corrupt or hostile file can
  only fail to decode, never run code. Any decode failure is a `StateError` naming the
  part; the caller ignores that part and logs why.
- The snapshot on disk encodes the store incrementally (`StoreEncoder`): each object's JSON
  is kept beside the (immutable) object it came from and reused while the store holds that
  same object, so a write after one change encodes one object, and the encoding runs in the
  writer's thread from a capture taken on the loop (shallow copies of the store's dicts).
- Affinity is restored into balancers that exist after the first sync (a pin for a port
  that no longer exists, or to an endpoint no longer usable, is dropped); a pin already
  present and younger wins (the successor may have served that client meanwhile).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from pyproxy.lifecycle.snapshot import gunzip, member
from pyproxy.model.affinity import AffinityTable
from pyproxy.model.objects import EndpointSlice, Node, Service, ServiceKey, ServicePortName
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable


class StateError(ValueError):
    pass


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # a dataclass's field names, looked up once per class


def encode_obj(obj: Any) -> Any:
    """A model dataclass (or a tuple/frozenset/scalar inside one) as a JSON tree."""
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    names = _FIELD_NAMES.get(type(obj))
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELD_NAMES[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
    if names is not None:
        return {name: encode_obj(getattr(obj, name)) for name in names}
    if isinstance(obj, (tuple, list)):
        return [encode_obj(v) for v in obj]
    if isinstance(obj, frozenset):
        return sorted(encode_obj(v) for v in obj)
    if isinstance(obj, enum.Enum):
        return encode_obj(obj.value)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise StateError(f"cannot encode {type(obj).__name__}")


def decode_obj(hint: Any, raw: Any, path: str = "") -> Any:
    """The inverse of `encode_obj`, driven by the type hint (strict: wrong shapes raise)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if raw is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return decode_obj(option, raw, path)
            except StateError as err:
                errors.append(str(err))
        raise StateError("; ".join(errors) or f"{path}: no type fits")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(raw, list):
            raise StateError(f"{path}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode_obj(args[0], v, f"{path}[{i}]") for i, v in enumerate(raw))
        if len(args) != len(raw):
            raise StateError(f"{path}: expected {len(args)} items")
        return tuple(decode_obj(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
    if origin is frozenset:
        (arg,) = typing.get_args(hint)
        if not isinstance(raw, list):
            raise StateError(f"{path}: expected a list")
        return frozenset(decode_obj(arg, v, path) for v in raw)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(raw)
        except ValueError:
            raise StateError(f"{path}: {raw!r} is not a {hint.__name__}") from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(raw, dict):
            raise StateError(f"{path}: expected an object for {hint.__name__}")
        hints = typing.get_type_hints(hint)
        fields = dataclasses.fields(hint)
        names = {f.name for f in fields}
        if set(raw) - names:
            raise StateError(f"{path}: {hint.__name__} has no field {sorted(set(raw) - names)[0]!r}")
        missing = [f.name for f in fields if f.name not in raw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise StateError(f"{path}: {hint.__name__} lacks {missing[0]!r}")
        # a field this release added (with a default) may be absent from an older one's state
        return hint(**{n: decode_obj(hints[n], raw[n], f"{path}.{n}") for n in names if n in raw})
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise StateError(f"{path}: expected a number")
        return float(raw)
    if hint in (str, int, bool):
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            raise StateError(f"{path}: expected {hint.__name__}")
        return raw
    raise StateError(f"{path}: unsupported type {hint!r}")


def store_state(store: ClusterStore) -> dict[str, Any]:
    return {
        "services": [encode_obj(s) for s in store.services.values()],
        "slices": [encode_obj(s) for s in store.slices.values()],
        "node": encode_obj(store.node) if store.node is not None else None,
    }


Captured = tuple[list[Service], list[EndpointSlice], Node | None]


class StoreEncoder:
    """`store_state` as compact JSON in gzip members (snapshot.py), compressing only objects not
    seen at the last call.

    `capture` runs on the loop (C-speed shallow copies); `chunks` may run in another thread,
    one call at a time: model objects are frozen, so a captured one never changes under it.
    Each object's member is kept with the comma before it (the first of a group: without).
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[object, bytes]] = {}  # id -> (the object itself, its member)

    @staticmethod
    def capture(store: ClusterStore) -> Captured:
        return list(store.services.values()), list(store.slices.values()), store.node

    def encode(self, captured: Captured) -> bytes:
        """The plain JSON (tests, tools)."""
        return gunzip(b"".join(self.chunks(captured)))

    def chunks(self, captured: Captured) -> list[bytes]:
        """The JSON as gzip members to write one after the other (no copy of the whole)."""
        services, slices, node = captured
        cache, fresh = self._cache, {}
        out: list[bytes] = []
        groups: tuple[tuple[bytes, list[Any]], ...] = ((b'{"services":[', services), (b'],"slices":[', slices))
        for opening, group in groups:
            out.append(member(opening))
            for i, obj in enumerate(group):
                key = id(obj) if i else -id(obj)  # the first of a group has no comma before it
                entry = cache.get(key)
                if entry is None or entry[0] is not obj:  # the identity check: ids are reused
                    entry = (obj, member(b"," + _compact(encode_obj(obj)) if i else _compact(encode_obj(obj))))
                fresh[key] = entry
                out.append(entry[1])
        self._cache = fresh  # objects gone from the store are forgotten
        out.append(member(b'],"node":' + _compact(encode_obj(node) if node is not None else None) + b"}"))
        return out


def _compact(tree: Any) -> bytes:
    return json.dumps(tree, separators=(",", ":")).encode()


def restore_store(store: ClusterStore, raw: Any) -> int:
    """Fill the store from `store_state`'s output; returns the number of Services."""
    if not isinstance(raw, Mapping):
        raise StateError("sync state: expected an object")
    try:
        services = [decode_obj(Service, s, "services") for s in raw["services"]]
        slices = [decode_obj(EndpointSlice, s, "slices") for s in raw["slices"]]
        node = decode_obj(Node | None, raw["node"], "node")
    except (KeyError, TypeError) as err:
        raise StateError(f"sync state: missing {err}") from None
    store.replace_all(services, slices)
    store.set_node(node)
    return len(services)


def affinity_state(table: ServiceTable, now: float) -> list[dict[str, Any]]:
    """Every pin as (port, client, endpoint, age); stale ones are left out."""
    out: list[dict[str, Any]] = []
    for name, balancer in table.affine.items():
        if balancer.affinity is None:
            continue
        timeout = balancer.affinity.timeout
        pins = [[ip, address[0], address[1], round(max(0.0, now - used), 3)]
                for ip, address, used in balancer.affinity.entries() if now - used <= timeout]
        if pins:
            out.append({"port": encode_obj(name), "pins": pins})
    return out


def restore_affinity(table: ServiceTable, raw: Any, now: float, extra_age: float = 0.0) -> int:
    """Pin again every client of `affinity_state`'s output (oldest first, so the LRU order
    holds); returns how many pins were restored."""
    if not isinstance(raw, list):
        raise StateError("affinity: expected a list")
    pins: list[tuple[float, AffinityTable, str, tuple[str, int]]] = []
    for i, part in enumerate(raw):
        try:
            name = decode_obj(ServicePortName, part["port"], f"affinity[{i}].port")
            entries = part["pins"]
        except (KeyError, TypeError) as err:
            raise StateError(f"affinity[{i}]: missing {err}") from None
        balancer = table.balancers.get(name)
        if balancer is None or balancer.affinity is None or not isinstance(entries, list):
            continue
        affinity = balancer.affinity
        usable = {e.address for e in table.ports[name].endpoints.all} if name in table.ports else set()
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 4):
                raise StateError(f"affinity[{i}]: a pin must be [client, ip, port, age]")
            client, ip, port, age = entry
            if not (isinstance(client, str) and isinstance(ip, str) and isinstance(port, int)
                    and isinstance(age, (int, float))):
                raise StateError(f"affinity[{i}]: a pin must be [client, ip, port, age]")
            used = now - float(age) - extra_age
            if (ip, port) not in usable or now - used > affinity.timeout:
                continue
            current = affinity.lookup_entry(client)
            if current is not None and current[1] >= used:
                continue
            pins.append((used, affinity, client, (ip, port)))
    pins.sort(key=lambda p: p[0])
    for used, affinity, client, address in pins:
        affinity.restore(client, address, used)
    return len(pins)


__all__ = ["ServiceKey", "StateError", "StoreEncoder", "affinity_state", "decode_obj", "encode_obj", "restore_affinity",
           "restore_store", "store_state"]
