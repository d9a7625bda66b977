"""The load tool: the bench wire protocol, the backend that speaks it, and the clients that
drive it (the Python load generator with its modes, the readiness probe, the restart
measurement, and `cload`, which runs a C/Go load generator and reports in the same summary
shape). Its commands keep their top-level names: `python -m bench.load`, `bench.backend`,
`bench.probe`, `bench.cload`, `bench.restart`. Imports nothing on purpose (`bench.probe` starts fast).
"""
