"""`python -m latentloop ...`: see latentloop/cli.py (or `python -m latentloop --help`)."""

import sys

from .cli import main

sys.exit(main())
