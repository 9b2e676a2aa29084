"""``python -m coordinator`` is the ``coordinator`` command."""

import sys

from .cli import main

sys.exit(main())
