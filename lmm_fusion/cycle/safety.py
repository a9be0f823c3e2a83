"""Rule-based safety guard over the model's suggestion (ROS-free, transparent, unit-tested).

The network proposes an action and a target speed; these rules can only make it more cautious:

1. **Stopping distance.** With free distance ``d`` ahead of the front bumper [m] (the nearer of the
   model's estimate and the raw LiDAR measurement when LiDAR is used), the speed is capped at
   ``v_max = sqrt(2 · a · (d − margin))`` so the vehicle can stop ``margin`` metres short braking at
   ``a`` [m/s²]. A cap below ``stop_speed`` turns the action into STOP.
2. **Time to collision.** TTC is the smaller of the model's and ``d / ego speed`` (GNSS). Below
   ``ttc_stop`` [s] the action is STOP at speed 0; below ``ttc_slow`` a KEEP_LANE/FOLLOW becomes
   SLOW_DOWN with the speed capped at ``slow_factor`` × the ego speed.
3. **Masked modalities.** Each masked modality scales the cap by ``degraded_factor``; without LiDAR
   the cap is also at most ``no_lidar_speed`` (nothing measures the geometry exactly).

Whenever a rule changes the action or lowers the speed, ``safety_override`` is set and the rationale
names the reason, e.g. ``"stop: obstacle 7.9 m ahead, TTC 0.6 s (lidar) [guard: TTC < 1.5 s]"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lmm_fusion.base.rig import EGO_FRONT_OFFSET
from lmm_fusion.base.vocabulary import Action
from lmm_fusion.cycle.assessment import MASKED_CONFIDENCE_FACTOR, Assessment


@dataclass(frozen=True)
class SafetyConfig:
    """Guard parameters (metres, seconds, m/s, m/s²)."""

    decel: float = 4.0  # braking deceleration assumed for the stopping-distance cap [m/s²]
    margin: float = 3.0  # gap to keep to the obstacle at standstill [m]
    ttc_stop: float = 1.5  # TTC below which the guard forces a stop [s]
    ttc_slow: float = 3.0  # TTC below which the guard forces slowing down [s]
    slow_factor: float = 0.7  # speed cap as a fraction of the ego speed when slowing for TTC
    stop_speed: float = 0.5  # caps below this mean "stop" [m/s]
    degraded_factor: float = 0.8  # cap multiplier per masked modality
    no_lidar_speed: float = 10.0  # absolute cap without LiDAR [m/s]
    max_speed: float = 30.0  # absolute cap [m/s]
    corridor_half_width: float = 1.5  # half width of the ego corridor for the LiDAR free distance [m]
    ground_height: float = 0.3  # points at or below this z in base_link are ground [m]
    max_height: float = 2.5  # points above this z pass over the vehicle (bridges, signs) [m]
    max_range: float = 60.0  # free distance beyond this is "free" [m]

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        positive = ("decel", "ttc_slow", "corridor_half_width", "max_range", "max_speed")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"safety.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("margin", "ttc_stop", "stop_speed", "no_lidar_speed"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"safety.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("slow_factor", "degraded_factor"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"safety.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.ttc_stop > self.ttc_slow:
            raise ValueError(f"safety.ttc_stop ({self.ttc_stop}) must be <= safety.ttc_slow ({self.ttc_slow})")
        if self.max_height <= self.ground_height:
            raise ValueError(f"safety.max_height ({self.max_height}) must be > safety.ground_height "
                             f"({self.ground_height})")


def lane_free_distance(points_base: np.ndarray, cfg: SafetyConfig = SafetyConfig()) -> float:
    """Free distance in the ego lane [m from the front bumper] from LiDAR points in ``base_link``.

    ``points_base``: (N, >=3) x, y, z [m]. The nearest point ahead of the bumper, inside the straight
    corridor ``|y| <= corridor_half_width`` and between ``ground_height`` and ``max_height`` is the
    obstacle; +inf when there is none within ``max_range``.
    """
    pts = np.asarray(points_base)
    if pts.ndim != 2 or pts.shape[1] < 3 or pts.shape[0] == 0:
        return math.inf
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ahead = x - EGO_FRONT_OFFSET
    sel = (ahead > 0) & (np.abs(y) <= cfg.corridor_half_width) & (z > cfg.ground_height) & (z < cfg.max_height)
    sel &= np.isfinite(ahead) & (ahead <= cfg.max_range)
    if not sel.any():
        return math.inf
    return float(ahead[sel].min())


def stopping_speed_cap(distance: float, cfg: SafetyConfig) -> float:
    """``sqrt(2·a·(d − margin))`` [m/s], 0 inside the margin, ``max_speed`` when free."""
    if not math.isfinite(distance):
        return cfg.max_speed
    return min(cfg.max_speed, math.sqrt(2.0 * cfg.decel * max(distance - cfg.margin, 0.0)))


def _fmt(x: float, unit: str) -> str:
    return f"{x:.1f} {unit}"


def describe(action: Action, distance: float, ttc: float, source: str, masked: list[str]) -> str:
    """Short rationale: ``"<action>: obstacle D m ahead, TTC T s (source)"`` plus masked modalities."""
    parts = []
    if math.isfinite(distance):
        parts.append(f"obstacle {_fmt(distance, 'm')} ahead")
    else:
        parts.append("lane free")
    if math.isfinite(ttc):
        parts.append(f"TTC {_fmt(ttc, 's')}")
    text = f"{action.name.lower().replace('_', ' ')}: {', '.join(parts)} ({source})"
    if masked:
        text += f" [{'+'.join(masked)} masked]"
    return text


def apply_guard(a: Assessment, lidar_free_distance: float | None, ego_speed: float | None,
                cfg: SafetyConfig = SafetyConfig()) -> Assessment:
    """Apply the rules of this module to a decoded assessment.

    ``lidar_free_distance`` [m] is :func:`lane_free_distance` of the current LiDAR frame (None when
    LiDAR is masked); ``ego_speed`` [m/s] comes from GNSS (None when GNSS is masked or invalid).
    Returns a new Assessment with the guarded action, target speed, ttc/distance, flags and rationale.
    """
    if not a.valid:
        return a
    masked = a.masked_names()
    # The guard acts on the nearer of the model's estimate and the raw LiDAR measurement: LiDAR is
    # exact geometry, the model may see what LiDAR cannot (e.g. a red light's stop line).
    distance, source = a.distance, "model"
    if lidar_free_distance is not None and lidar_free_distance <= distance:
        distance, source = lidar_free_distance, "lidar"
    ttc = a.ttc
    if ego_speed is not None and ego_speed > 0.1 and math.isfinite(distance):
        ttc = min(ttc, distance / ego_speed)

    cap = stopping_speed_cap(distance, cfg) * cfg.degraded_factor ** len(masked)
    if lidar_free_distance is None:
        cap = min(cap, cfg.no_lidar_speed)
    reasons: list[str] = []
    action, speed = a.action, a.target_speed

    if ttc < cfg.ttc_stop:
        action, speed = Action.STOP, 0.0
        reasons.append(f"TTC < {cfg.ttc_stop:g} s")
    else:
        if ttc < cfg.ttc_slow and action in (Action.KEEP_LANE, Action.FOLLOW):
            action = Action.SLOW_DOWN
            reasons.append(f"TTC < {cfg.ttc_slow:g} s")
        if ttc < cfg.ttc_slow and ego_speed is not None:
            cap = min(cap, cfg.slow_factor * ego_speed)
        if speed > cap:
            speed = cap
            reasons.append(f"speed capped to {cap:.1f} m/s" + (" (degraded)" if masked else ""))
        if speed < cfg.stop_speed and cap < cfg.stop_speed and action != Action.STOP:
            action, speed = Action.STOP, 0.0
            reasons.append("inside stopping distance")

    override = action != a.action or speed < a.target_speed - 1e-6
    text = describe(action, distance, ttc, source, masked)
    if override:
        text += f" [guard: {'; '.join(reasons)}]"
    confidence = a.confidence
    if action != a.action:
        # Confidence stays "the model's probability of the chosen action", reduced when masked.
        confidence = float(a.action_probs[action]) * MASKED_CONFIDENCE_FACTOR ** len(masked)
    return replace(a, action=action, target_speed=float(speed), ttc=ttc, distance=distance,
                   safety_override=override, rationale=text, confidence=confidence,
                   lidar_free_distance=math.inf if lidar_free_distance is None else lidar_free_distance,
                   ego_speed=ego_speed)
