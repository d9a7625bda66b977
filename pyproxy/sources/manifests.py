"""Standalone source: Services, EndpointSlices (and optionally this Node) from YAML files.

Rules kept here:
- Every `*.yaml` / `*.yml` file in the directory is read; files may hold several documents.
  Only regular files (or symlinks to them) are opened: a FIFO, socket or device could
  block the reader forever, so it is skipped with a problem line naming it.
- Files are bounded (`ManifestLimits`: size, documents, depth, alias expansion) before
  any object is built from them (`bounded_yaml`); reads and parses run in a thread, never
  on the event loop.
- A file that cannot be read or parsed, or breaks a limit, makes the whole load fail
  (`ManifestError`): at start that is a fatal error, at reload the last good state keeps
  serving.
- A document that parses but is not a valid object is skipped with a problem line naming
  the file, the object and the reason; a bad part of an object (a port, an endpoint) is
  skipped likewise and the rest of the object is used; the rest of the load goes on.
- The directory is polled (size and mtime of each file): a change is seen within one poll
  interval, without inotify or extra dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyproxy.config import ManifestLimits
from pyproxy.model.fields import describe
from pyproxy.model.objects import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from pyproxy.sources.bounded_yaml import YamlError, YamlLimits, load_all

log = logging.getLogger("pyproxy.manifests")


class ManifestError(RuntimeError):
    pass


@dataclass
class ManifestSnapshot:
    services: list[Service] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)
    node: Node | None = None
    problems: list[str] = field(default_factory=list)  # objects (and files) skipped
    parts: list[str] = field(default_factory=list)  # parts of objects skipped, the rest used


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


def yaml_limits(limits: ManifestLimits) -> YamlLimits:
    return YamlLimits(max_bytes=limits.maxFileSize, max_documents=limits.maxDocuments,
                      max_depth=limits.maxDepth, max_alias_nodes=limits.maxAliasExpansion)


def load_manifests(
    directory: Path, node_name: str, proxy_name: str | None = None, limits: ManifestLimits = ManifestLimits()
) -> ManifestSnapshot:
    snapshot = ManifestSnapshot()
    seen: dict[tuple[str, str], str] = {}
    bounds = yaml_limits(limits)
    for path in manifest_files(directory):
        text = _read(path, bounds, snapshot)
        if text is None:
            continue
        try:
            documents = load_all(text, bounds)
        except YamlError as err:
            raise ManifestError(f"{path}: {err}") from None
        for index, doc in enumerate(documents):
            if doc is None:
                continue
            where = f"{path.name}[{index}]"
            try:
                _add(snapshot, doc, where, seen, node_name, proxy_name)
            except InvalidObject as err:
                snapshot.problems.append(f"{where}: {err}")
    return snapshot


def _read(path: Path, limits: YamlLimits, snapshot: ManifestSnapshot) -> str | None:
    """The file's text; None (with a problem line) for a file that is not a regular one."""
    try:
        info = os.stat(path)  # follows a symlink: what matters is what it points to
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(info.st_mode):
            snapshot.problems.append(f"{path.name}: not a regular file ({_file_type(info.st_mode)}); skipped")
            return None
        _check_size(path, info.st_size, limits)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # swapped since the stat
                snapshot.problems.append(f"{path.name}: not a regular file; skipped")
                return None
            data = file.read(limits.max_bytes + 1)
        _check_size(path, len(data), limits)
        return data.decode()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot be read: {err}") from None


def _check_size(path: Path, size: int, limits: YamlLimits) -> None:
    if size > limits.max_bytes:
        raise ManifestError(f"{path}: larger than {limits.max_bytes} bytes (manifestLimits.maxFileSize)")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _add(
    snapshot: ManifestSnapshot,
    doc: Any,
    where: str,
    seen: dict[tuple[str, str], str],
    node_name: str,
    proxy_name: str | None,
) -> None:
    if not isinstance(doc, dict):
        raise InvalidObject("document", "?", f"is not a mapping ({describe(doc)})")
    kind = doc.get("kind")
    if kind == "List":
        items = doc.get("items")
        if items is not None and not isinstance(items, list):
            raise InvalidObject("List", "?", f"items: expected a list, got {describe(items)}")
        for i, item in enumerate(items or ()):
            item_where = f"{where}.items[{i}]"
            try:
                _add(snapshot, item, item_where, seen, node_name, proxy_name)
            except InvalidObject as err:  # a bad item skips itself, not the rest of the List
                snapshot.problems.append(f"{item_where}: {err}")
        return
    parts: list[InvalidObject] = []
    if kind == "Service":
        service = parse_service(doc, proxy_name, report=parts.append)
        if service is not None:
            _claim(seen, ("Service", str(service.key)), where)
            snapshot.services.append(service)
    elif kind == "EndpointSlice":
        endpoint_slice = parse_endpoint_slice(doc, report=parts.append)
        if endpoint_slice is not None:
            _claim(seen, ("EndpointSlice", f"{endpoint_slice.namespace}/{endpoint_slice.name}"), where)
            snapshot.slices.append(endpoint_slice)
    elif kind == "Node":
        node = parse_node(doc, report=parts.append)
        if node.name != node_name:
            return  # another node's: its problems are not ours either
        snapshot.node = node
    else:
        log.debug("%s: ignoring kind %s", where, describe(kind))
    snapshot.parts.extend(f"{where}: {err}" for err in parts)


def _claim(seen: dict[tuple[str, str], str], identity: tuple[str, str], where: str) -> None:
    if identity in seen:
        raise InvalidObject(identity[0], identity[1], f"already defined in {seen[identity]}")
    seen[identity] = where


async def watch_manifests(
    directory: Path,
    node_name: str,
    proxy_name: str | None,
    deliver: Callable[[ManifestSnapshot], Awaitable[None] | None],
    interval: float,
    stop: asyncio.Event,
    last: Fingerprint | None,
    limits: ManifestLimits = ManifestLimits(),
    activity: Callable[[str], None] = lambda _: None,
) -> None:
    """Poll `directory` until `stop` is set; deliver each new good snapshot (`last` None:
    load at once). `activity` hears what it is doing, for the supervisor's log line."""
    while not stop.is_set():
        if last is not None:
            activity(f"waiting for changes in {directory}")
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
        activity(f"polling {directory}")
        try:
            current = await asyncio.to_thread(fingerprint, directory)
        except ManifestError as err:
            log.error("manifest directory unreadable, last good state keeps serving: %s", err)
            last = last or ()
            continue
        if current == last:
            continue
        activity(f"reloading {directory} ({_changed(last or (), current)})")
        try:
            snapshot = await asyncio.to_thread(load_manifests, directory, node_name, proxy_name, limits)
        except ManifestError as err:
            log.error("manifest reload refused, last good state keeps serving: %s", err)
            last = current
            continue
        last = current
        log.info("manifests reloaded: %d services, %d endpoint slices", len(snapshot.services), len(snapshot.slices))
        activity(f"applying the manifests of {directory}")
        result = deliver(snapshot)
        if result is not None:
            await result


def _changed(before: Fingerprint, after: Fingerprint) -> str:
    """The names of the files that differ, for a log line."""
    names = sorted({f[0] for f in set(before) ^ set(after)})
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "first load"
