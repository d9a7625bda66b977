"""`python -m bench.restart`: what a restart of the proxy costs its clients (run by the runner).

Its code lives in `bench.loadtool.restart`; this module only keeps the command's name.
"""

import sys

from bench.loadtool.restart import main

if __name__ == "__main__":
    sys.exit(main())
