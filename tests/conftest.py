"""Settings every tier shares.

Hypothesis draws the same examples every run and keeps no example database, so a property test
fails on a change, never on the draw (a test that fails once in a while is a failing test).
`HYPOTHESIS_PROFILE=explore` draws new examples each run, to look for new counterexamples.
"""

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
