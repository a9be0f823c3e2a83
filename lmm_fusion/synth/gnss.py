"""GNSS fixes of the ego's antenna around the rig's geodetic origin.

The ``map`` frame is ENU (x east, y north, z up) at the rig's geodetic origin, so an antenna
position in ``map`` converts with ``pymap3d.enu2geodetic``. Normally the receiver has an RTK-grade
fix (NavSatStatus GBAS_FIX, the rig's horizontal/vertical std); occasionally (probability
``degraded_probability`` per fix) it drops to a plain fix for 1-4 s with ~20x larger noise, and the
reported covariance follows the true noise so a consumer can weight it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pymap3d

from lmm_fusion.base.rig import SensorRig

STATUS_FIX = 0
STATUS_GBAS_FIX = 2
#: Noise multiplier while degraded.
DEGRADED_FACTOR = 20.0


@dataclass(frozen=True)
class FixSample:
    """One simulated fix: geodetic position, NavSatStatus status, (9,) ENU covariance [m^2]."""

    lat: float
    lon: float
    alt: float
    status: int
    covariance: np.ndarray
    degraded: bool


class GnssSimulator:
    """Fixes for one rig; keeps the degraded-episode state between calls."""

    def __init__(self, rig: SensorRig, rng: np.random.Generator) -> None:
        self.rig = rig
        self.model = rig.gnss
        self.rng = rng
        self.degraded_until = -math.inf

    def antenna_enu(self, pose: tuple[float, float, float]) -> np.ndarray:
        """Antenna position in ``map`` (ENU) [m] for an ego pose (x, y, yaw) in ``map``."""
        x, y, yaw = pose
        m = self.rig.gnss_mount
        c, s = math.cos(yaw), math.sin(yaw)
        return np.array([x + c * m.x - s * m.y, y + s * m.x + c * m.y, m.z])

    def fix(self, t: float, pose: tuple[float, float, float]) -> FixSample:
        """A fix at time ``t`` [s] for the true ego ``pose`` in ``map``."""
        g = self.model
        if t >= self.degraded_until and self.rng.random() < g.degraded_probability:
            self.degraded_until = t + float(self.rng.uniform(1.0, 4.0))
        degraded = t < self.degraded_until
        k = DEGRADED_FACTOR if degraded else 1.0
        h_std, v_std = g.horizontal_std * k, g.vertical_std * k
        e, n, u = self.antenna_enu(pose) + self.rng.standard_normal(3) * np.array([h_std, h_std, v_std])
        lat, lon, alt = pymap3d.enu2geodetic(e, n, u, g.origin_lat, g.origin_lon, g.origin_alt)
        cov = np.diag([h_std ** 2, h_std ** 2, v_std ** 2]).reshape(-1)
        return FixSample(float(lat), float(lon), float(alt), STATUS_FIX if degraded else STATUS_GBAS_FIX, cov,
                         degraded)
