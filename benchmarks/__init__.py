"""Benchmarks, the soak and the floods: run from the repository's root as
``python -m benchmarks.NAME``; not installed with the package.  They start clusters with the
tests' helper (tests/harness.py), made importable here once for all of them."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)
