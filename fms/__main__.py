"""``python -m fms``: the same as the ``fms`` console script."""

import sys

from .cli import main

sys.exit(main())
