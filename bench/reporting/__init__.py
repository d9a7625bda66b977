"""A run's figures and files: measurements turned into per-core figures and cross-round
statistics (`summary`), then the markdown tables and the PNG plot (`render`). Pure except for
writing the files; the data folder of past results is `bench/results/`, not this package.
"""
