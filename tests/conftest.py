"""Hypothesis profile for every test process: ``ci`` (derandomized, no database) unless chosen otherwise.

The test command is deterministic by default, so a fresh clone is green or red for a reason.
Random exploration is opt-in: ``HYPOTHESIS_PROFILE=dev`` (100 random examples per property)
or ``HYPOTHESIS_PROFILE=thorough`` (1000), e.g. ``HYPOTHESIS_PROFILE=dev bash scripts/test.sh``.
"""

import os

from hypothesis import settings

from cautious.conformance import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")
