"""`python -m vzstream ...`: the command line lives in `vzstream.cli`."""

import sys

from vzstream.cli import main

if __name__ == "__main__":
    sys.exit(main())
