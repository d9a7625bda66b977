"""YAML with limits: a file's size, documents, nesting depth and alias expansion are bounded
before a single Python object is built from it.

Theory of operation:
- The bytes are bounded first (`max_bytes`): the caller reads at most that much + 1.
- One pass over the parser's *events* (the parser is a state machine, not a recursion, so
  a document nested 100,000 deep costs memory for its events only, never a RecursionError)
  counts documents and depth, and the size every anchor stands for: a scalar is one node,
  a collection one plus its children, an alias as many as its anchor. A document whose
  aliases would expand to more than `max_alias_nodes` nodes is refused (the "billion
  laughs": 9 levels of 10 aliases each are 10^9 nodes in a few hundred bytes).
- Only then is the text constructed, with the safe loader, so every value built is within
  the limits; the walk of the constructed values (the parser of objects) is bounded too.
- Anything the YAML library raises is a `YamlError` with the reason; nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class YamlLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_documents: int = 10000
    max_depth: int = 64
    max_alias_nodes: int = 100_000


class YamlError(ValueError):
    pass


def check_events(text: str, limits: YamlLimits) -> None:
    """Raise YamlError if `text` breaks a limit (see the module doc)."""
    documents = 0
    open_sizes: list[int] = []  # expanded node count of each open collection
    open_anchors: list[str | None] = []
    anchored: dict[str, int] = {}
    expanded = 0  # nodes aliases stand for, in this document
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            expanded = 0
            if documents > limits.max_documents:
                raise YamlError(f"more than {limits.max_documents} documents (maxDocuments)")
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            open_sizes.append(1)
            open_anchors.append(event.anchor)
            if len(open_sizes) > limits.max_depth:
                raise YamlError(f"nested deeper than {limits.max_depth} levels (maxDepth), line {_line(event)}")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = open_sizes.pop(), open_anchors.pop()
            _add(open_sizes, size)
            if anchor is not None:
                anchored[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            _add(open_sizes, 1)
            if event.anchor is not None:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = anchored.get(event.anchor or "", 1)
            expanded += size
            if expanded > limits.max_alias_nodes:
                raise YamlError(
                    f"aliases expand to more than {limits.max_alias_nodes} nodes (maxAliasExpansion), line {_line(event)}")
            _add(open_sizes, size)


def _add(open_sizes: list[int], size: int) -> None:
    if open_sizes:
        open_sizes[-1] += size


def _line(event: Any) -> int:
    mark = getattr(event, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 0


def load_all(text: str, limits: YamlLimits) -> list[Any]:
    """Every document of `text`, after the limits are checked; YamlError otherwise."""
    try:
        check_events(text, limits)
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as err:
        raise YamlError(f"not valid YAML: {' '.join(str(err).split())}") from None  # one log line
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as err:
        if isinstance(err, YamlError):
            raise
        raise YamlError(f"cannot be parsed: {type(err).__name__}: {str(err)[:200]}") from None
