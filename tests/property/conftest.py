"""Hypothesis settings of the property suite.

The default profile (`ci`) is derandomized (the same examples on every run, so CI is never
flaky), keeps no example database and keeps the whole suite to a few seconds. Set
``HYPOTHESIS_PROFILE=thorough`` for a longer, randomized search on a workstation.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=1000,  # ms per example; an example is a handful of calls of well under 1 ms
    max_examples=100,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    derandomize=False,
    database=None,
    deadline=2000,
    max_examples=5000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
