"""`python -m bench.scale --services N`: pyproxy against kube-proxy through a real API server.

Its code lives in `bench.rigs.scale`; this module only keeps the command's name.
"""

import sys

from bench.rigs.scale import main

if __name__ == "__main__":
    sys.exit(main())
