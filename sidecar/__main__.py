"""`python -m sidecar` is the `mandate` command."""

import sys

from .cli import main

sys.exit(main())
