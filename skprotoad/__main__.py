"""``python -m skprotoad``: the command line, see :mod:`skprotoad.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
