"""Hypothesis profiles for every test process: ``ci`` under CI, ``dev`` otherwise.

Select another with ``HYPOTHESIS_PROFILE=thorough``.
"""

import os

from hypothesis import settings

from cautious.conformance import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
