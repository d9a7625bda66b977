"""`python -m bench.load`: the load generator (one mode, one or several processes).

Its code lives in `bench.loadtool.load`; this module only keeps the command's name.
"""

import sys

from bench.loadtool.load import main

if __name__ == "__main__":
    sys.exit(main())
