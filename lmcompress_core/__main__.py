"""``python -m lmcompress_core ...``: see cli.py."""
import sys

from lmcompress_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
