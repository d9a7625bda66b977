"""Standalone source: Services, EndpointSlices (and optionally this Node) from YAML files.

Rules kept here:
- Every `*.yaml` / `*.yml` file in the directory is read; files may hold several documents.
- A file that cannot be read or parsed makes the whole load fail (`ManifestError`): at
  start that is a fatal error, at reload the last good state keeps serving.
- A document that parses but is not a valid object is skipped with a problem line naming
  the file, the object and the reason; the rest of the load goes on.
- The directory is polled (size and mtime of each file): a change is seen within one poll
  interval, without inotify or extra dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyproxy.model.objects import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)

log = logging.getLogger("pyproxy.manifests")


class ManifestError(RuntimeError):
    pass


@dataclass
class ManifestSnapshot:
    services: list[Service] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)
    node: Node | None = None
    problems: list[str] = field(default_factory=list)


Fingerprint = tuple[tuple[str, int, int], ...]


def manifest_files(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        raise ManifestError(f"manifest directory {directory}: {err.strerror}") from None
    return [directory / n for n in names if n.endswith((".yaml", ".yml")) and not n.startswith(".")]


def fingerprint(directory: Path) -> Fingerprint:
    result = []
    for path in manifest_files(directory):
        try:
            st = path.stat()
        except OSError:
            continue
        result.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(result)


def load_manifests(directory: Path, node_name: str, proxy_name: str | None = None) -> ManifestSnapshot:
    snapshot = ManifestSnapshot()
    seen: dict[tuple[str, str, str], str] = {}
    for path in manifest_files(directory):
        for index, doc in enumerate(_documents(path)):
            if doc is None:
                continue
            where = f"{path.name}[{index}]"
            try:
                _add(snapshot, doc, where, seen, node_name, proxy_name)
            except InvalidObject as err:
                snapshot.problems.append(f"{where}: {err}")
    return snapshot


def _documents(path: Path) -> list[Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot be read: {err}") from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None


def _add(
    snapshot: ManifestSnapshot,
    doc: Any,
    where: str,
    seen: dict[tuple[str, str, str], str],
    node_name: str,
    proxy_name: str | None,
) -> None:
    if not isinstance(doc, dict):
        raise InvalidObject("document", "?", "is not a mapping")
    kind = doc.get("kind")
    if kind == "List":
        items = doc.get("items")
        if items is not None and not isinstance(items, list):
            raise InvalidObject("List", "?", "items: expected a list")
        for i, item in enumerate(items or ()):
            item_where = f"{where}.items[{i}]"
            try:
                _add(snapshot, item, item_where, seen, node_name, proxy_name)
            except InvalidObject as err:  # a bad item skips itself, not the rest of the List
                snapshot.problems.append(f"{item_where}: {err}")
        return
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InvalidObject(str(kind), "?", "metadata is not a mapping")
    identity = (str(kind), str(meta.get("namespace") or "default"), str(meta.get("name")))
    if kind in ("Service", "EndpointSlice") and identity in seen:
        raise InvalidObject(str(kind), f"{identity[1]}/{identity[2]}", f"already defined in {seen[identity]}")
    seen[identity] = where
    if kind == "Service":
        service = parse_service(doc, proxy_name)
        if service is not None:
            snapshot.services.append(service)
    elif kind == "EndpointSlice":
        endpoint_slice = parse_endpoint_slice(doc)
        if endpoint_slice is not None:
            snapshot.slices.append(endpoint_slice)
    elif kind == "Node":
        node = parse_node(doc)
        if node.name == node_name:
            snapshot.node = node
    else:
        log.debug("%s: ignoring kind %s", where, kind)


async def watch_manifests(
    directory: Path,
    node_name: str,
    proxy_name: str | None,
    deliver: Callable[[ManifestSnapshot], Awaitable[None] | None],
    interval: float,
    stop: asyncio.Event,
    last: Fingerprint,
) -> None:
    """Poll `directory` until `stop` is set; deliver each new good snapshot."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except asyncio.TimeoutError:
            pass
        try:
            current = await asyncio.to_thread(fingerprint, directory)
        except ManifestError as err:
            log.error("manifest directory unreadable, last good state keeps serving: %s", err)
            continue
        if current == last:
            continue
        try:
            snapshot = await asyncio.to_thread(load_manifests, directory, node_name, proxy_name)
        except ManifestError as err:
            log.error("manifest reload refused, last good state keeps serving: %s", err)
            last = current
            continue
        last = current
        log.info("manifests reloaded: %d services, %d endpoint slices", len(snapshot.services), len(snapshot.slices))
        result = deliver(snapshot)
        if result is not None:
            await result
