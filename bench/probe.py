"""`python -m bench.probe`: is the path to a backend usable? The runner's readiness check.

Its code lives in `bench.loadtool.probe`; this module only keeps the command's name.
"""

import sys

from bench.loadtool.probe import main

if __name__ == "__main__":
    sys.exit(main())
