"""DDS transport settings for large sensor samples (see config/fastdds_large_data.xml)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from lmm_fusion.base.paths import find_shared

PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


def large_data_profile() -> str:
    """Path of the shipped Fast DDS profile with a shared-memory segment sized for full-size sensors."""
    return str(find_shared("config/fastdds_large_data.xml"))


def use_large_data_profile(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Point ``env`` (default: this process's environment, before any rclpy context is created) at the
    large-data profile, unless the user already chose a profile. Returns ``env``."""
    env = os.environ if env is None else env
    if not any(env.get(v) for v in PROFILE_VARS):
        path = large_data_profile()
        for v in PROFILE_VARS:
            env[v] = path
    return env
