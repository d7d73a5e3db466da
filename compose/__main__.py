"""``python -m compose``: see ``compose.cli``."""

import sys

from compose.cli import main

sys.exit(main())
