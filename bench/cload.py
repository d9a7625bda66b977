"""`python -m bench.cload`: a C/Go load generator, its result in the load tool's summary shape.

Its code lives in `bench.loadtool.cload`; this module only keeps the command's name.
"""

import sys

from bench.loadtool.cload import main

if __name__ == "__main__":
    sys.exit(main())
