"""`python -m bench.backend`: the benchmark backend every workload talks to.

Its code lives in `bench.loadtool.backend`; this module only keeps the command's name.
"""

import sys

from bench.loadtool.backend import main

if __name__ == "__main__":
    sys.exit(main())
