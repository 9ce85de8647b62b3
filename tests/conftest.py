"""Test configuration: hypothesis profiles.

"default" is derandomised, so every run (and CI) checks the same examples; set
HYPOTHESIS_PROFILE=explore to draw new ones.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("default", derandomize=True, database=None, **_common)
settings.register_profile("explore", derandomize=False, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
