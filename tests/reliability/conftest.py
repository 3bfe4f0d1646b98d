"""Hypothesis profiles for the reliability suite.

`ci` (the default) keeps every property to a few seconds: few examples, derandomized so a run is
reproducible, a generous per-example deadline (the machine is shared). `thorough` is for a
hunting session: HYPOTHESIS_PROFILE=thorough pytest tests/reliability -k property
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=2000,  # ms per example
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", max_examples=3000, deadline=None, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
