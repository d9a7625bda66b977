"""`python -m bench.run`: the contenders side by side, in network namespaces.

Its code lives in `bench.runner.run`; this module only keeps the command's name.
"""

import sys

from bench.runner.run import main

if __name__ == "__main__":
    sys.exit(main())
