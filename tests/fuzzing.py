"""How hard the hypothesis tests search: a pytest plugin (conftest.py's ``pytest_plugins``).

The default suite runs a moderate number of examples; ``FMS_HYPOTHESIS_PROFILE=soak`` runs every
hypothesis test at its full count (docs/DEVELOPMENT.md, *Long runs*).  Tests with a count of
their own take it from :func:`examples`; plain ``@given`` tests take the loaded profile's."""

import os

from hypothesis import settings

PROFILES = ("default", "soak")
PROFILE = os.environ.get("FMS_HYPOTHESIS_PROFILE", "default")
if PROFILE not in PROFILES:
    raise SystemExit(f"FMS_HYPOTHESIS_PROFILE={PROFILE!r}: say one of {', '.join(PROFILES)}")

settings.register_profile("soak", max_examples=1000)
settings.load_profile(PROFILE)


def examples(default: int, soak: int) -> int:
    """A test's number of examples: ``default`` in the default suite, ``soak`` under the soak
    profile."""
    return soak if PROFILE == "soak" else default
