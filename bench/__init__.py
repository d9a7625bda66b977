"""pyproxy's benchmark kit: a load tool, a backend, and a side-by-side runner.

- `python -m bench.backend`: the server every workload talks to (`bench.protocol`).
- `python -m bench.load`: the load generator (stream, rr, crr, latency, idle, affinity).
- `python -m bench.run`: builds network namespaces, runs the contenders of shared/BENCH.md
  interleaved, and writes JSON, a markdown table and a plot.

Kept light on purpose: importing `bench` imports nothing, so `python -m bench.probe` starts fast.
"""
