"""`python -m bench.controlplane`: time from an endpoint change to the next connection routed by it.

Its code lives in `bench.rigs.controlplane`; this module only keeps the command's name.
"""

import sys

from bench.rigs.controlplane import main

if __name__ == "__main__":
    sys.exit(main())
