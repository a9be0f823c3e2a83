"""``sensor_msgs/NavSatFix`` -> :class:`GnssFix`, and ego motion from a sequence of fixes.

:class:`EgoMotionEstimator` converts fixes to a local ENU frame with ``pymap3d.geodetic2enu`` and
runs a motion filter on them (:class:`~lmm_fusion.io.motion_filter.ManoeuvreFilter`: two constant-
acceleration Kalman filters, cruising and manoeuvring, mixed by how well each explains the fixes),
each fix weighted by its stated position covariance (``position_covariance``; without one, the
scatter of the recent fixes about a polynomial fit). A degraded fix (a float fix with a 1 m
covariance among 5 cm RTK fixes) therefore barely moves the estimate: the motion model holds it.
Heading is the direction of the velocity (ENU, 0 = east, counter-clockwise positive) and the yaw rate
is the slope of a straight line fitted to the unwrapped headings of the recent window.

Speed is the magnitude of the velocity with the noise's share removed: ``E|v|^2 = |v_true|^2 +
tr(P_v)``, so ``speed = sqrt(max(0, |v|^2 - tr(P_v)))`` and a standing car reads 0 rather than the
magnitude of its velocity noise. ``speed_std`` is the filter's along-track velocity std.

Measured (6 synthetic-receiver drives of 60 s from fresh seeds, not those the constants were chosen
on; 10 Hz RTK 5 cm with 1-4 s episodes of 1 m noise about a third of the time): speed error median /
p90 / p99 0.20 / 1.27 / 3.2 m/s (the former 1.5 s quadratic window fit: 0.53 / 2.27 / 4.3 m/s); a
standing car reads 0.0 at the median, 0.18 m/s at p90 (window fit: 0.82 / 3.1 m/s); 74 % of the
errors within 1 ``speed_std``, 92 % within 2 (window fit: 46 % / 72 %). White 5 cm noise at 12 m/s:
median error 0.067 m/s at 10 Hz, 0.077 m/s at 1 Hz (window fit 0.069 / 0.036), ``speed_std`` there
conservative by ~1.7x / 2x; standing still: 0.0 at the median and p90 (window fit 0.12 / 0.22 m/s).
Noise-free tracks are exact to 1 % anywhere. Constants are in :class:`EgoMotionConfig`.

The ENU frame is anchored near the vehicle, never at a fixed place: at the first fix, and again at
the newest fix once the vehicle is more than 1 km from the anchor (the window is carried over into
the new frame). A fixed origin far away tilts the local horizontal: a 10 m move north reads as
4.9 m in San Francisco against a Munich origin. Within 1 km the frame's curvature error is below
1e-4 of a distance and its convergence angle below 0.03 deg at 70 deg latitude.

Slower receivers: the window stretches to hold ~5 fixes at the observed rate (bounded) and 3 fixes
suffice for a first estimate when 4 would take longer than the nominal window, so a 1 Hz receiver
gives an estimate after 2 s; ``EgoState.speed_std`` says how much less certain it is.

Implausible fixes (a jump above a physical speed, or far outside the stated covariance around the
predicted position) raise :class:`MessageError` and leave the history untouched, so the next good
fixes continue the estimate; a few consistent fixes at a new place are a real relocation.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pymap3d

from lmm_fusion.io.common import as_int, stamp_to_sec
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.motion_filter import ManoeuvreFilter
from lmm_fusion.io.msgtypes import MsgTypes

STATUS_UNKNOWN = -2
STATUS_NO_FIX = -1
STATUS_FIX = 0
STATUS_SBAS_FIX = 1
STATUS_GBAS_FIX = 2
COVARIANCE_TYPE_UNKNOWN = 0
COVARIANCE_TYPE_DIAGONAL_KNOWN = 2


@dataclass(frozen=True)
class GnssFix:
    """One ``sensor_msgs/NavSatFix``: ``stamp`` [s], ``lat``/``lon`` [deg], ``alt`` [m above the WGS-84
    ellipsoid], ``status`` (NavSatStatus.STATUS_*), ``covariance`` (9,) ENU position covariance [m^2]
    (row-major), ``covariance_type`` (NavSatFix.COVARIANCE_TYPE_*).

    The one fix record of the project: :func:`read_fix` returns it validated, the synthetic receiver
    (:class:`lmm_fusion.synth.gnss.GnssSimulator`) and the CARLA conversion
    (:func:`lmm_fusion.carla.convert.gnss_to_fix`) produce it, and :func:`create_fix` takes its fields."""

    stamp: float
    lat: float
    lon: float
    alt: float
    status: int
    covariance: np.ndarray
    covariance_type: int

    @property
    def horizontal_std(self) -> float:
        """sqrt of the mean east/north variance [m]; NaN when the covariance type is unknown."""
        if self.covariance_type == COVARIANCE_TYPE_UNKNOWN:
            return float("nan")
        return math.sqrt(max(0.0, 0.5 * (float(self.covariance[0]) + float(self.covariance[4]))))


def read_fix(msg: Any) -> GnssFix:
    """NavSatFix -> :class:`GnssFix`.

    Raises :class:`MessageError` for status NO_FIX (-1) or a status outside -2..2, non-finite or
    out-of-range latitude/longitude/altitude, a covariance that is not 9 finite numbers, or a
    malformed header stamp. Status UNKNOWN (-2) is accepted (many simulators never set it).
    """
    try:
        stamp = stamp_to_sec(msg.header.stamp)
        status = as_int("status.status", msg.status.status)
        lat, lon, alt = msg.latitude, msg.longitude, msg.altitude
        cov_raw = msg.position_covariance
        cov_type = as_int("position_covariance_type", msg.position_covariance_type)
    except AttributeError as exc:
        raise MessageError(f"NavSatFix: missing field {exc.name!r}") from None
    if status == STATUS_NO_FIX:
        raise MessageError(f"status.status: {status} (NO_FIX), the fix carries no position")
    if not STATUS_UNKNOWN <= status <= 2:
        raise MessageError(f"status.status: {status} outside -2..2")
    values = {}
    for name, v in (("latitude", lat), ("longitude", lon), ("altitude", alt)):
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise MessageError(f"{name}: expected a number, got {v!r}")
        values[name] = float(v)
        if not math.isfinite(values[name]):
            raise MessageError(f"{name}: {v} is not finite")
    if abs(values["latitude"]) > 90.0:
        raise MessageError(f"latitude: {values['latitude']} outside [-90, 90]")
    if abs(values["longitude"]) > 180.0:
        raise MessageError(f"longitude: {values['longitude']} outside [-180, 180]")
    if abs(values["altitude"]) > 1e5:
        raise MessageError(f"altitude: {values['altitude']} outside [-1e5, 1e5] m")
    try:
        cov = np.array(cov_raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"position_covariance: not numbers: {exc}") from None
    if cov.shape != (9,):
        raise MessageError(f"position_covariance: {cov.size} values, expected 9")
    if not np.isfinite(cov).all():
        raise MessageError(f"position_covariance: non-finite values {cov.tolist()}")
    if not 0 <= cov_type <= 3:
        raise MessageError(f"position_covariance_type: {cov_type} outside 0..3")
    return GnssFix(stamp, values["latitude"], values["longitude"], values["altitude"], status, cov, cov_type)


def create_fix(
    types: MsgTypes,
    header: Any,
    lat: float,
    lon: float,
    alt: float,
    status: int = STATUS_FIX,
    covariance: Any = None,
    covariance_type: int | None = None,
) -> Any:
    """NavSatFix of ``types`` (GPS service). ``covariance``: (9,) [m^2], or a scalar std [m] giving a
    diagonal covariance, or None (unknown). ``covariance_type`` defaults to DIAGONAL_KNOWN when a
    covariance is given, UNKNOWN otherwise."""
    if covariance is None:
        cov = np.zeros(9)
        ctype = COVARIANCE_TYPE_UNKNOWN if covariance_type is None else covariance_type
    else:
        arr = np.asarray(covariance, dtype=np.float64)
        cov = np.diag([float(arr) ** 2] * 3).reshape(-1) if arr.ndim == 0 else arr.reshape(9).copy()
        ctype = COVARIANCE_TYPE_DIAGONAL_KNOWN if covariance_type is None else covariance_type
    return types.NavSatFix(
        header=header,
        status=types.NavSatStatus(status=int(status), service=1),
        latitude=float(lat),
        longitude=float(lon),
        altitude=float(alt),
        position_covariance=cov,
        position_covariance_type=int(ctype),
    )


@dataclass(frozen=True)
class EgoState:
    """Ego motion at ``stamp`` [s]: position in the estimator's local ENU frame [m] (anchored near the
    vehicle, see :class:`EgoMotionEstimator`), ``speed`` [m/s] (>= 0), ``accel`` [m/s^2] (along the
    direction of travel, negative = braking), ``heading`` [rad, ENU, 0 = east, counter-clockwise],
    ``yaw_rate`` [rad/s], GNSS ``status``, ``horizontal_std`` [m] (the fix's stated std; without a
    stated covariance the scatter of the window's fixes about a polynomial fit, NaN until measurable).
    ``valid`` is False until the window holds enough fixes for a motion estimate; speed, accel and yaw
    rate are then 0, heading is the last known one (0 at start) and ``reason`` says why (e.g.
    ``"waiting for fixes (1 of 3)"``; empty when valid). ``speed`` has the noise's share of the
    velocity's magnitude removed (a standing car reads ~0). ``speed_std`` [m/s]: the motion filter's
    1-sigma of the velocity along the direction of travel (NaN when invalid), from the fixes' stated
    covariances, so degraded fixes and a slow receiver say they are less certain; calibrated on
    synthetic drives (74 % of errors within 1 sigma, 92 % within 2)."""

    stamp: float
    east: float
    north: float
    up: float
    speed: float
    accel: float
    heading: float
    yaw_rate: float
    status: int
    horizontal_std: float
    valid: bool
    speed_std: float = math.nan
    reason: str = ""


@dataclass(frozen=True)
class EgoMotionConfig:
    """Filter constants.

    Window (adapts to the receiver's rate, observed as the median interval of recent fixes):
    ``window`` [s] is the shortest fit window; it stretches to hold ``window_fixes`` fixes at the
    observed rate, at most ``max_window`` [s] (1 Hz: 4.5 s, 5 fixes; 5 Hz and faster: 1.5 s).
    ``min_fixes`` fixes make a valid estimate, ``min_fixes_slow`` when ``min_fixes`` fixes at the
    observed rate would span more than ``window`` (a 1 Hz receiver: 3 fixes, 2 s, not 4 fixes, 3 s).
    ``max_gap`` [s] between fixes before the history restarts (at least ``gap_periods`` receiver periods).
    ``min_speed_heading`` [m/s] below which heading is held and yaw rate is 0 (the direction of a
    near-zero velocity is noise).

    ENU anchor: the first fix; a fix more than ``reanchor_distance`` [m] from the anchor moves it there.

    Jump rejection (a fix is checked against the last accepted one up to ``jump_horizon`` [s] back):
    rejected when it implies more than ``max_speed`` [m/s] over a distance beyond the noise
    (``gate_sigma`` combined stds, at least ``jump_floor`` [m]), or, with a motion estimate and known
    covariances, when it lies more than ``gate_sigma`` combined stds plus ``0.5 * max_accel * dt^2``
    (an unmodelled change of acceleration) from the predicted position. ``relocate_fixes`` consecutive
    rejected fixes consistent with each other are a real relocation: the history restarts there.

    Motion filter (:class:`~lmm_fusion.io.motion_filter.ManoeuvreFilter`): white jerk of
    ``jerk_psd_cruise`` and of ``jerk_psd_manoeuvre`` [m^2/s^5] for its two constant-acceleration
    models, switching at ``switch_rate`` [1/s]; a new history starts at its first fix with zero
    velocity and acceleration of std ``init_speed_std`` [m/s] and ``init_accel_std`` [m/s^2]. A
    stated position std is floored at ``min_position_std`` [m] (a receiver claiming zero covariance
    would otherwise freeze the filter).
    """

    window: float = 1.5
    window_fixes: int = 5
    max_window: float = 5.0
    min_fixes: int = 4
    min_fixes_slow: int = 3
    max_gap: float = 2.0
    gap_periods: float = 2.5
    min_speed_heading: float = 0.5
    reanchor_distance: float = 1000.0
    max_speed: float = 90.0
    max_accel: float = 10.0
    gate_sigma: float = 8.0
    jump_floor: float = 1.0
    jump_horizon: float = 10.0
    relocate_fixes: int = 3
    jerk_psd_cruise: float = 0.01
    jerk_psd_manoeuvre: float = 30.0
    switch_rate: float = 0.3
    init_speed_std: float = 30.0
    init_accel_std: float = 5.0
    min_position_std: float = 0.005


#: Recent fix intervals the receiver's period is the median of.
_RATE_INTERVALS = 9


@dataclass
class EgoMotionEstimator:
    """Successive :class:`GnssFix` -> :class:`EgoState` (see the module docstring for the filter).

    The ENU anchor ``(origin_lat, origin_lon, origin_alt)`` follows the vehicle: None until the first
    fix, which becomes it (a given anchor is kept only while the vehicle is within
    ``config.reanchor_distance`` of it), and moved to the newest fix when the vehicle is farther than
    that from it. At a re-anchor the window's fixes are converted to the new frame from their geodetic
    positions and the held headings are turned by the frames' convergence angle, so speed, acceleration
    and heading carry on without a step (``reanchors`` counts them).

    Time going backwards (a bag loop) or a gap over the effective ``max_gap`` restarts the history
    (``resets``); a repeated stamp returns the previous state unchanged. An implausible fix (see
    :class:`EgoMotionConfig`) raises :class:`MessageError` and leaves the history as it was
    (``rejected`` counts them); ``relocations`` counts restarts at a persistent new position.
    ``reason`` says why the latest estimate is not valid, or "" when it is. Not thread-safe (callers lock).
    """

    origin_lat: float | None = None
    origin_lon: float | None = None
    origin_alt: float | None = None
    config: EgoMotionConfig = field(default_factory=EgoMotionConfig)
    resets: int = 0
    reanchors: int = 0
    rejected: int = 0
    relocations: int = 0
    reason: str = "no fix yet"
    _hist: deque = field(default_factory=deque, repr=False)  # (stamp, e, n, u, lat, lon, alt, std, cov 2x2)
    _headings: deque = field(default_factory=deque, repr=False)  # (stamp, heading in the anchor frame)
    _intervals: deque = field(default_factory=lambda: deque(maxlen=_RATE_INTERVALS), repr=False)
    _candidates: list = field(default_factory=list, repr=False)  # rejected fixes, oldest first
    _last_fix: GnssFix | None = field(default=None, repr=False)  # the last accepted fix
    _last: EgoState | None = field(default=None, repr=False)
    _heading: float = field(default=0.0, repr=False)
    _kf: ManoeuvreFilter | None = field(default=None, repr=False)  # the motion filter, in the anchor frame

    # ------------------------------------------------------------------ rate-adapted constants
    @property
    def period(self) -> float:
        """The receiver's observed period [s] (median of recent intervals); NaN before two fixes."""
        return float(np.median(self._intervals)) if self._intervals else math.nan

    @property
    def window(self) -> float:
        """Effective fit window [s] at the observed rate."""
        c, p = self.config, self.period
        if not math.isfinite(p):
            return c.window
        return min(max(c.window, (c.window_fixes - 0.5) * p), c.max_window)

    @property
    def required_fixes(self) -> int:
        """Fixes a valid estimate needs at the observed rate."""
        c, p = self.config, self.period
        if math.isfinite(p) and (c.min_fixes - 1) * p > c.window + 1e-9:
            return min(c.min_fixes_slow, c.min_fixes)
        return c.min_fixes

    @property
    def max_gap(self) -> float:
        """Effective gap [s] between fixes that restarts the history."""
        c, p = self.config, self.period
        return max(c.max_gap, c.gap_periods * p) if math.isfinite(p) else c.max_gap

    @property
    def state(self) -> EgoState | None:
        """The latest state returned (None before the first fix)."""
        return self._last

    # ------------------------------------------------------------------ history
    def reset(self) -> None:
        """Forget the history (the anchor is kept)."""
        self._hist.clear()
        self._headings.clear()
        self._intervals.clear()
        self._candidates.clear()
        self._last = None
        self._last_fix = None
        self._kf = None
        self.resets += 1

    def note_no_fix(self, detail: str = "") -> None:
        """Record that the receiver reported no usable fix (``read_fix`` refused it), for :attr:`reason`."""
        self.reason = "no fix" + (f": {detail}" if detail else "")

    def _enu(self, lat: float, lon: float, alt: float) -> tuple[float, float, float]:
        assert self.origin_lat is not None and self.origin_lon is not None and self.origin_alt is not None
        e, n, u = pymap3d.geodetic2enu(lat, lon, alt, self.origin_lat, self.origin_lon, self.origin_alt)
        return float(e), float(n), float(u)

    def _anchor(self, lat: float, lon: float, alt: float) -> None:
        """Move the ENU anchor to (lat, lon, alt): window fixes re-expressed, headings turned."""
        old = (self.origin_lat, self.origin_lon, self.origin_alt)
        if old[0] is not None and old[1] is not None and old[2] is not None:
            # Convergence angle: the new frame's north axis seen in the old frame. A heading (ENU,
            # counter-clockwise from east) in the old frame is that much larger than in the new one.
            step = pymap3d.enu2geodetic(0.0, 100.0, 0.0, lat, lon, alt)
            e0, n0, _ = pymap3d.geodetic2enu(lat, lon, alt, *old)
            e1, n1, _ = pymap3d.geodetic2enu(float(step[0]), float(step[1]), float(step[2]), *old)
            turn = math.atan2(-(float(e1) - float(e0)), float(n1) - float(n0))
            self._heading = _wrap(self._heading - turn)
            self._headings = deque((t, h - turn) for t, h in self._headings)
            self.reanchors += 1
            if self._kf is not None:
                # The filter's position goes through geodetic coordinates, its vectors turn with the frame.
                x = self._kf.x
                g = pymap3d.enu2geodetic(float(x[0]), float(x[1]), 0.0, *old)
                e, n, _ = pymap3d.geodetic2enu(float(g[0]), float(g[1]), float(g[2]), lat, lon, alt)
                self._kf.move_frame(np.array([float(e), float(n)]), -turn)
        self.origin_lat, self.origin_lon, self.origin_alt = lat, lon, alt
        self._hist = deque((h[0], *self._enu(h[4], h[5], h[6]), *h[4:]) for h in self._hist)

    # ------------------------------------------------------------------ plausibility
    def _implausible(self, fix: GnssFix, ref: GnssFix, predict: bool) -> str | None:
        """Why ``fix`` cannot follow ``ref`` (an earlier fix), or None when it can."""
        c = self.config
        dt = fix.stamp - ref.stamp
        if not 0.0 < dt <= c.jump_horizon:
            return None
        e0, n0, _ = self._enu(ref.lat, ref.lon, ref.alt)
        e1, n1, _ = self._enu(fix.lat, fix.lon, fix.alt)
        dist = math.hypot(e1 - e0, n1 - n0)
        s_new, s_ref = fix.horizontal_std, ref.horizontal_std
        known = math.isfinite(s_new) and math.isfinite(s_ref)
        noise = c.gate_sigma * math.hypot(s_new, s_ref) if known else 0.0
        where = f"latitude/longitude: ({fix.lat:.7f}, {fix.lon:.7f})"
        if dist > max(c.jump_floor, noise) and dist / dt > c.max_speed:
            return (f"{where} is {dist:.1f} m from the last fix {dt:.3f} s earlier: implied speed "
                    f"{dist / dt:.0f} m/s > {c.max_speed:g} m/s")
        if predict and known and self._kf is not None and self._last is not None and self._last.valid:
            # The filter's prediction (without manoeuvre noise: the allowance below stands for it).
            x, p = self._kf.predicted(fix.stamp)
            miss = math.hypot(e1 - float(x[0]), n1 - float(x[1]))
            sd = math.sqrt(s_new ** 2 + s_ref ** 2 + 0.5 * float(p[0, 0] + p[1, 1]))
            gate = c.gate_sigma * sd + 0.5 * c.max_accel * dt * dt
            if miss > gate:
                return (f"{where} is {miss:.2f} m from the position predicted {dt:.3f} s ahead, over the "
                        f"gate {gate:.2f} m ({c.gate_sigma:g} x combined std {sd:.3f} m + manoeuvre allowance)")
        return None

    def _reject(self, fix: GnssFix, why: str) -> EgoState:
        """Count ``fix`` as rejected (raise) unless it completes a persistent relocation (restart there)."""
        c = self.config
        if self._candidates and (self._implausible(fix, self._candidates[-1], predict=False) is not None
                                 or not 0.0 < fix.stamp - self._candidates[-1].stamp <= self.max_gap):
            self._candidates.clear()
        self._candidates.append(fix)
        if len(self._candidates) >= c.relocate_fixes:
            fixes = list(self._candidates)
            self.reset()
            self.relocations += 1
            for f in fixes[:-1]:
                self._accept(f)
            return self._accept(fixes[-1])
        self.rejected += 1
        self.reason = f"implausible jump rejected: {why}"
        raise MessageError(f"{why} (implausible jump rejected; {len(self._candidates)} of {c.relocate_fixes} "
                           "consistent fixes would accept a relocation)")

    # ------------------------------------------------------------------ update
    def update(self, fix: GnssFix) -> EgoState:
        """Add ``fix`` and return the ego state at its stamp.

        Raises :class:`MessageError` for a NO_FIX status or a non-finite stamp or position (fixes made
        by :func:`read_fix` never have them; hand-built ones might), and for an implausible jump (the
        message names the position, the distance and the bound it broke).
        """
        if fix.status == STATUS_NO_FIX:
            self.note_no_fix("status NO_FIX")
            raise MessageError(f"status: {fix.status} (NO_FIX) cannot update the ego motion")
        if not all(math.isfinite(v) for v in (fix.stamp, fix.lat, fix.lon, fix.alt)):
            raise MessageError(f"fix: non-finite stamp/lat/lon/alt {(fix.stamp, fix.lat, fix.lon, fix.alt)}")
        if self._last is not None and fix.stamp == self._last.stamp:
            return self._last
        if self.origin_lat is not None and self.origin_lon is not None and self.origin_alt is not None \
                and self._last_fix is None:
            e, n, _ = self._enu(fix.lat, fix.lon, fix.alt)
            if math.hypot(e, n) > self.config.reanchor_distance:
                self._anchor(fix.lat, fix.lon, fix.alt)
        if self.origin_lat is None or self.origin_lon is None or self.origin_alt is None:
            self._anchor(fix.lat, fix.lon, fix.alt)
        ref = self._last_fix
        if ref is not None and fix.stamp < ref.stamp:
            self.reset()  # a bag loop: a new start, not a jump
            ref = None
        if ref is not None:
            intact = fix.stamp - ref.stamp <= self.max_gap
            why = self._implausible(fix, ref, predict=intact)
            if why is not None:
                return self._reject(fix, why)  # raises unless a relocation completes
            if not intact:
                self.reset()
        self._candidates.clear()
        return self._accept(fix)

    # ------------------------------------------------------------------ filter
    def _scatter_cov(self) -> np.ndarray:
        """Without a stated covariance: the window's scatter about a polynomial fit, as a 2x2 ENU
        covariance [m^2] (NaN until the window has residuals)."""
        if len(self._hist) < 3:
            return np.full((2, 2), math.nan)
        h = np.asarray([row[:3] for row in self._hist], dtype=np.float64)
        t = h[:, 0] - h[-1, 0]
        deg = 2 if len(h) >= 5 else 1
        coef = np.polynomial.polynomial.polyfit(t, h[:, 1:3], deg)
        resid = h[:, 1:3] - np.polynomial.polynomial.polyval(t, coef).T
        var = max(float(np.sum(resid ** 2)) / (2 * (len(h) - deg - 1)), self.config.min_position_std ** 2)
        return np.eye(2) * var

    def _filter(self, stamp: float, e: float, n: float, r: np.ndarray) -> None:
        """Update the Kalman filter with the position (e, n) [m] of covariance ``r`` (2, 2) [m^2] at
        ``stamp``. A new filter starts at the window's first fix and runs through the window (so fixes
        without a stated covariance wait until their scatter is known)."""
        if not np.isfinite(r).all():
            return
        c = self.config
        if self._kf is None:
            rows = list(self._hist)
            first = rows[0]
            self._kf = ManoeuvreFilter(np.array(first[1:3]), first[8] if np.isfinite(first[8]).all() else r,
                                       first[0], (c.jerk_psd_cruise, c.jerk_psd_manoeuvre), c.switch_rate,
                                       c.init_speed_std, c.init_accel_std)
            for row in rows[1:]:
                self._kf.update(row[0], np.array(row[1:3]), row[8] if np.isfinite(row[8]).all() else r)
            return
        self._kf.update(stamp, np.array([e, n]), r)

    def _accept(self, fix: GnssFix) -> EgoState:
        """Add a plausible fix to the history and the filter; the state at its stamp."""
        c = self.config
        e, n, u = self._enu(fix.lat, fix.lon, fix.alt)
        if math.hypot(e, n) > c.reanchor_distance:
            self._anchor(fix.lat, fix.lon, fix.alt)
            e, n, u = self._enu(fix.lat, fix.lon, fix.alt)
        if self._last_fix is not None:
            self._intervals.append(fix.stamp - self._last_fix.stamp)
        self._last_fix = fix
        self._hist.append((fix.stamp, e, n, u, fix.lat, fix.lon, fix.alt, fix.horizontal_std, _stated_cov(fix, c)))
        window = self.window
        while self._hist and fix.stamp - self._hist[0][0] > window + 1e-9:
            self._hist.popleft()
        while self._headings and fix.stamp - self._headings[0][0] > window + 1e-9:
            self._headings.popleft()

        speed = accel = yaw_rate = 0.0
        speed_std = math.nan
        h_std = fix.horizontal_std
        required = self.required_fixes
        valid = len(self._hist) >= required
        r = self._hist[-1][8] if math.isfinite(self._hist[-1][8][0, 0]) else self._scatter_cov()
        if math.isnan(h_std) and math.isfinite(r[0, 0]):
            h_std = math.sqrt(0.5 * float(r[0, 0] + r[1, 1]))
        self._filter(fix.stamp, e, n, r)
        if valid and self._kf is not None and math.isfinite(r[0, 0]):
            x, p = self._kf.x, self._kf.p
            vel, acc, pv = x[2:4], x[4:6], p[2:4, 2:4]
            raw = float(np.hypot(vel[0], vel[1]))
            # |v| of a noisy velocity is biased upwards by the noise (E|v^|^2 = |v|^2 + tr Pv): subtract
            # it, so a standing car reads ~0 rather than the noise's magnitude.
            speed = math.sqrt(max(0.0, raw * raw - float(np.trace(pv))))
            direction = vel / raw if raw > 0.0 else np.array([math.cos(self._heading), math.sin(self._heading)])
            speed_std = math.sqrt(max(0.0, float(direction @ pv @ direction)))
            if speed >= c.min_speed_heading:
                self._heading = math.atan2(float(vel[1]), float(vel[0]))
                accel = float(direction @ acc)
                self._headings.append((fix.stamp, self._heading))
                if len(self._headings) >= required:
                    hh = np.asarray(self._headings, dtype=np.float64)
                    yaw_rate = float(np.polyfit(hh[:, 0] - fix.stamp, np.unwrap(hh[:, 1]), 1)[0])
            else:
                self._headings.clear()
                accel = float(np.hypot(acc[0], acc[1])) * (1.0 if vel @ acc >= 0 else -1.0)
        else:
            valid = valid and self._kf is not None and math.isfinite(r[0, 0])
        self.reason = "" if valid else f"waiting for fixes ({len(self._hist)} of {required})"
        state = EgoState(
            stamp=fix.stamp,
            east=e,
            north=n,
            up=u,
            speed=speed,
            accel=accel,
            heading=self._heading,
            yaw_rate=yaw_rate,
            status=fix.status,
            horizontal_std=h_std,
            valid=valid,
            speed_std=speed_std,
            reason=self.reason,
        )
        self._last = state
        return state


def _stated_cov(fix: GnssFix, config: EgoMotionConfig) -> np.ndarray:
    """The fix's stated east/north covariance (2, 2) [m^2], variances floored at
    ``config.min_position_std``; NaN when the covariance type is unknown."""
    if fix.covariance_type == COVARIANCE_TYPE_UNKNOWN:
        return np.full((2, 2), math.nan)
    c = np.asarray(fix.covariance, dtype=np.float64)
    floor = config.min_position_std ** 2
    ve, vn = max(float(c[0]), floor), max(float(c[4]), floor)
    cross = 0.5 * (float(c[1]) + float(c[3]))
    if cross * cross >= 0.99 * ve * vn:  # not positive definite as stated: keep the variances only
        cross = 0.0
    return np.array([[ve, cross], [cross, vn]])


def _wrap(angle: float) -> float:
    """Angle [rad] -> (-pi, pi]."""
    return math.atan2(math.sin(angle), math.cos(angle))
