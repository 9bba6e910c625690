"""Entry point for `python -m minimal_registry` and for the PyInstaller one-file binary."""

import sys

from minimal_registry.cli import main

if __name__ == "__main__":
    sys.exit(main())
