"""`python -m sidecar` is the `mandate` command."""

import sys

from sidecar.cli import main

sys.exit(main())
