"""`python -m bench.smoke`: CI's benchmark smoke (`bench.run --quick`, checked).

Its code lives in `bench.runner.smoke`; this module only keeps the command's name.
"""

import sys

from bench.runner.smoke import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
