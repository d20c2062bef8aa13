"""``python -m emerdiff_pl``: the same as the ``emerdiff-pl`` command."""

import sys

from emerdiff_pl.cli import main

if __name__ == "__main__":
    sys.exit(main())
