"""Shared pytest configuration: hypothesis profiles.

`default` keeps the suite within its time budget; `HYPOTHESIS_PROFILE=thorough`
runs many more examples for a deeper local check."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
