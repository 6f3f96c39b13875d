"""`python -m jaxcodec compress|decompress ...` (see jaxcodec/cli.py)."""

import sys

from jaxcodec.cli import main

sys.exit(main())
