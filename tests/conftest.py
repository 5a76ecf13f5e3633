"""Settings for every test suite.

Hypothesis runs derandomized by default: each test draws the same examples on every run,
so a broken branch fails every CI run rather than some. ``HYPOTHESIS_PROFILE=explore``
draws afresh on every run when hunting for new failures locally.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
