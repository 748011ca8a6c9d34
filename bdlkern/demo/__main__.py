"""``python -m bdlkern.demo``: the demo's entry point; the command line is :func:`bdlkern.demo.cli.main`."""

import sys

from bdlkern.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
