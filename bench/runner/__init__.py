"""The runner: builds the network namespaces, starts the backends and the contenders in them,
runs each workload's load against each contender in interleaved rounds, and stops exactly
what it started (`python -m bench.run`); plus CI's smoke over a quick run (`python -m bench.smoke`).
"""
