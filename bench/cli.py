"""`pyproxy-bench`: one console entry point for the bench kit.

`main(argv) -> int` only dispatches to the tool named first (a load mode alone means the
load tool); each tool keeps its own `main` and its own `--help`. `HELP` is what a user
sees; this docstring is for readers of the code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

from bench.loadtool.loadargs import MODES

TOOLS = ("load", "run", "backend", "probe", "controlplane", "relayrig", "scale")
HELP = """usage: pyproxy-bench TOOL [options]

pyproxy's benchmark kit: a load generator, and a runner that measures pyproxy beside
HAProxy, nginx, socat and nftables DNAT on network namespaces it builds (root).
See bench/README.md.

tools:
  pyproxy-bench MODE --target HOST:PORT ...
        the load tool in one mode: stream, rr, crr, latency, idle or affinity
        (the same as 'pyproxy-bench load MODE ...')
  pyproxy-bench run [--quick] ...
        the side-by-side runner: every contender, interleaved rounds, JSON, markdown
        and a plot (root; --quick takes about 4 minutes)
  pyproxy-bench backend ...        the benchmark backend server
  pyproxy-bench probe --target HOST:PORT
        check that a full request and answer get through a path
  pyproxy-bench controlplane ...   time from an endpoint change to the next connection routed by it
  pyproxy-bench relayrig ...       one pyproxy relay without kernel rules (profiling)
  pyproxy-bench scale --services N pyproxy against kube-proxy through a real API server (root)

'pyproxy-bench TOOL --help' describes each tool's options."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
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
