"""Rigs: pyproxy's own pieces assembled in one process without the whole proxy around them,
for profiling and focused measurements: one relay with a one-service table and no kernel rules
(`python -m bench.relayrig`, used by `bench/profile.sh` and the data-path tests), and the
control plane from an endpoint change to the next connection routed (`python -m bench.controlplane`).
"""
