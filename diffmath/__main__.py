"""``python -m diffmath``: the same command line as the ``diffmath`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
