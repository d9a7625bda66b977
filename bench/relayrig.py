"""`python -m bench.relayrig`: one pyproxy relay with a one-service table, no kernel rules.

Its code lives in `bench.rigs.relayrig`; this module only keeps the command's name.
"""

import sys

from bench.rigs.relayrig import main

if __name__ == "__main__":
    sys.exit(main())
