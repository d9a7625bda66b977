"""pyproxy's benchmark kit: a load tool, a backend, and a side-by-side runner.

- `python -m bench.backend`: the server every workload talks to (`bench.loadtool.protocol`).
- `python -m bench.load`: the load generator (stream, rr, crr, latency, idle, affinity).
- `python -m bench.run`: builds network namespaces, runs the contenders of shared/BENCH.md
  interleaved, and writes JSON, a markdown table and a plot.

Rooms: `loadtool` (the wire protocol, backend and load clients), `runner` (namespaces,
contenders, workloads, the run), `reporting` (figures, tables, plot), `rigs` (pyproxy's pieces
alone: relayrig, controlplane). The `python -m bench.X` commands and `pyproxy-bench`
(`bench.cli`) keep their top-level names through thin modules here.

Kept light on purpose: importing `bench` imports nothing, so `python -m bench.probe` starts fast.
"""
