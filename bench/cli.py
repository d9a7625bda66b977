"""`pyproxy-bench`: one console entry point for the bench kit.

    pyproxy-bench MODE --target HOST:PORT ...     the load tool (MODE: stream, rr, crr, latency, idle, affinity)
    pyproxy-bench load MODE ...                   the same, spelled out
    pyproxy-bench run [--quick] ...               the side-by-side runner
    pyproxy-bench backend|probe|controlplane|relayrig ...

`main(argv) -> int` only dispatches; each tool keeps its own `main`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

from bench.loadargs import MODES

TOOLS = ("load", "run", "backend", "probe", "controlplane", "relayrig")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    tool = args[0]
    if tool in MODES:  # `pyproxy-bench crr ...` is the load tool
        tool, args = "load", args
    elif tool in TOOLS:
        args = args[1:]
    else:
        print(f"pyproxy-bench: unknown tool or mode {tool!r}; see pyproxy-bench --help", file=sys.stderr)
        return 2
    entry: Callable[[list[str]], int] = import_module(f"bench.{tool}").main
    return int(entry(args))


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
