"""``python -m lopkit ...``: the same command line as the ``lopkit`` script."""

import sys

from lopkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
