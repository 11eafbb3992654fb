"""Hypothesis profiles. ``ci`` (the default) is derandomized: every run draws the same examples,
so a red run is a real regression, never an unlucky draw. ``long`` is randomized with ten
times the examples (``./dev test-long``); ``dev`` is a quick local run. Select with
HYPOTHESIS_PROFILE."""

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("long", derandomize=False, max_examples=2000, deadline=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
