"""GNSS fixes of the ego's antenna around the drive's geodetic origin.

The ``map`` frame is ENU (x east, y north, z up) at the drive's geodetic origin (the rig's
``GnssModel`` origin unless one is given: ``lmm-fusion synth --origin LAT,LON``, :func:`rig_at_origin`),
so an antenna position in ``map`` converts with ``pymap3d.enu2geodetic``; a drive can be placed
anywhere on Earth, the ego-motion estimator anchors its own frame near the vehicle. Normally the
receiver has an RTK-grade fix (NavSatStatus GBAS_FIX, the rig's horizontal/vertical std);
occasionally (probability ``degraded_probability`` per fix) it drops to a plain fix (STATUS_FIX)
for 1-4 s with ~20x larger noise, and the reported covariance follows the true noise so a consumer
can weight it. Fixes are :class:`~lmm_fusion.io.gnss.GnssFix` records, the same the NavSatFix reader returns.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import numpy as np
import pymap3d

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.io.gnss import COVARIANCE_TYPE_DIAGONAL_KNOWN, STATUS_FIX, STATUS_GBAS_FIX, GnssFix

#: Noise multiplier while degraded.
DEGRADED_FACTOR = 20.0


def parse_origin(text: str) -> tuple[float, float, float | None]:
    """``"LAT,LON"`` or ``"LAT,LON,ALT"`` (deg, deg, m above the WGS-84 ellipsoid) -> (lat, lon, alt | None);
    an argparse ``type``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected LAT,LON or LAT,LON,ALT, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in LAT,LON[,ALT], got {text!r}") from None
    lat, lon = values[0], values[1]
    alt = values[2] if len(values) == 3 else None
    if not (math.isfinite(lat) and abs(lat) <= 89.0):
        raise argparse.ArgumentTypeError(f"latitude {lat} outside [-89, 89] deg")
    if not (math.isfinite(lon) and abs(lon) <= 180.0):
        raise argparse.ArgumentTypeError(f"longitude {lon} outside [-180, 180] deg")
    if alt is not None and not (math.isfinite(alt) and abs(alt) <= 1e4):
        raise argparse.ArgumentTypeError(f"altitude {alt} outside [-1e4, 1e4] m")
    return lat, lon, alt


def rig_at_origin(rig: SensorRig, origin: tuple[float, float, float | None] | None) -> SensorRig:
    """``rig`` with its GNSS geodetic origin (of ``map``) moved to ``origin`` = (lat [deg], lon [deg],
    alt [m] | None = the rig's); ``rig`` unchanged for None."""
    if origin is None:
        return rig
    lat, lon, alt = origin
    return replace(rig, gnss=replace(rig.gnss, origin_lat=float(lat), origin_lon=float(lon),
                                     origin_alt=rig.gnss.origin_alt if alt is None else float(alt)))


class GnssSimulator:
    """Fixes for one rig; keeps the degraded-episode state between calls. ``origin`` (lat [deg],
    lon [deg], alt [m]) is the geodetic position of ``map``'s origin, the rig's GNSS origin by default."""

    def __init__(self, rig: SensorRig, rng: np.random.Generator,
                 origin: tuple[float, float, float] | None = None) -> None:
        self.rig = rig
        self.model = rig.gnss
        self.rng = rng
        self.degraded_until = -math.inf
        g = rig.gnss
        self.origin = (g.origin_lat, g.origin_lon, g.origin_alt) if origin is None else origin

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
        lat, lon, alt = pymap3d.enu2geodetic(e, n, u, *self.origin)
        cov = np.diag([h_std ** 2, h_std ** 2, v_std ** 2]).reshape(-1)
        return GnssFix(float(t), float(lat), float(lon), float(alt), STATUS_FIX if degraded else STATUS_GBAS_FIX,
                       cov, COVARIANCE_TYPE_DIAGONAL_KNOWN)
