"""GNSS fixes of the ego's antenna around the rig's geodetic origin.

The ``map`` frame is ENU (x east, y north, z up) at the rig's geodetic origin, so an antenna
position in ``map`` converts with ``pymap3d.enu2geodetic``. Normally the receiver has an RTK-grade
fix (NavSatStatus GBAS_FIX, the rig's horizontal/vertical std); occasionally (probability
``degraded_probability`` per fix) it drops to a plain fix (STATUS_FIX) for 1-4 s with ~20x larger
noise, and the reported covariance follows the true noise so a consumer can weight it. Fixes are
:class:`~lmm_fusion.io.gnss.GnssFix` records, the same the NavSatFix reader returns.
"""

from __future__ import annotations

import math

import numpy as np
import pymap3d

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.io.gnss import COVARIANCE_TYPE_DIAGONAL_KNOWN, STATUS_FIX, STATUS_GBAS_FIX, GnssFix

#: Noise multiplier while degraded.
DEGRADED_FACTOR = 20.0


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

    def fix(self, t: float, pose: tuple[float, float, float]) -> GnssFix:
        """A fix at time ``t`` [s] (its stamp) for the true ego ``pose`` in ``map``; status STATUS_FIX
        while degraded, STATUS_GBAS_FIX otherwise; diagonal covariance of the true noise [m^2]."""
        g = self.model
        if t >= self.degraded_until and self.rng.random() < g.degraded_probability:
            self.degraded_until = t + float(self.rng.uniform(1.0, 4.0))
        degraded = t < self.degraded_until
        k = DEGRADED_FACTOR if degraded else 1.0
        h_std, v_std = g.horizontal_std * k, g.vertical_std * k
        e, n, u = self.antenna_enu(pose) + self.rng.standard_normal(3) * np.array([h_std, h_std, v_std])
        lat, lon, alt = pymap3d.enu2geodetic(e, n, u, g.origin_lat, g.origin_lon, g.origin_alt)
        cov = np.diag([h_std ** 2, h_std ** 2, v_std ** 2]).reshape(-1)
        return GnssFix(float(t), float(lat), float(lon), float(alt), STATUS_FIX if degraded else STATUS_GBAS_FIX,
                       cov, COVARIANCE_TYPE_DIAGONAL_KNOWN)
