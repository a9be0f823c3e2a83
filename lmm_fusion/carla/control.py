"""Closed-loop control of a CARLA ego vehicle from the pipeline's suggestions; importable without ``carla``.

Each cycle the :class:`ClosedLoopController` turns the latest :class:`~lmm_fusion.cycle.assessment.Assessment`
into one :class:`ControlCommand`:

* no valid (or a stale) assessment -> ``autopilot``: the bridge hands the car to CARLA's Traffic
  Manager until a valid one arrives again;
* ``STOP`` -> ``stop``: full brake, throttle 0, the speed controller's integral cleared;
* otherwise -> ``pipeline``: a longitudinal PID (:class:`LongitudinalPid`) drives to the suggested
  target speed and pure pursuit (:func:`pure_pursuit_steer`) follows the centre line of the ego lane,
  or of the neighbouring lane during a lane change, given as points by a :class:`LaneMap` (the
  bridge builds those from the map's waypoints: ``get_left_lane`` / ``get_right_lane``).

Every intervention (mode switch, hard brake, lane change started / finished / refused / aborted) is
logged and kept in :attr:`ClosedLoopController.events`.

Sign conventions: geometry is REP-103 (``base_link``: x forward, y left; a positive road-wheel
angle turns left); :class:`ControlCommand` is in CARLA's ``VehicleControl`` convention, where a
positive ``steer`` turns *right* (left-handed frame), so :func:`steer_to_carla` negates.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from lmm_fusion.base.vocabulary import Action

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- longitudinal
@dataclass(frozen=True)
class PidConfig:
    """Gains of the speed controller; the command ``u`` is unitless in [-1, 1] per m/s of error.

    ``u > 0`` is throttle (capped at ``max_throttle``), ``u < -brake_deadband`` is brake (capped at
    ``max_brake``); in between the car coasts, so small decelerations use drag instead of pulsing the
    brake. ``integral_limit`` [m/s * s] bounds the integral term (anti-windup, together with
    conditional integration: the integral does not grow while the output is saturated in the
    direction of the error).
    """

    kp: float = 0.35
    ki: float = 0.08
    kd: float = 0.02
    integral_limit: float = 8.0
    max_throttle: float = 0.8
    max_brake: float = 1.0
    brake_deadband: float = 0.08


class LongitudinalPid:
    """PID on speed error with anti-windup and a throttle/brake split."""

    def __init__(self, cfg: PidConfig | None = None) -> None:
        self.cfg = cfg or PidConfig()
        self.integral = 0.0
        self._prev_error: float | None = None

    def reset(self) -> None:
        """Forget the integral and derivative history (after a hard brake or a hand-over)."""
        self.integral = 0.0
        self._prev_error = None

    def step(self, target_speed: float, speed: float, dt: float) -> tuple[float, float]:
        """One update; ``target_speed`` and ``speed`` in m/s, ``dt`` in s. Returns (throttle, brake),
        each in [0, 1], never both > 0."""
        if not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"dt: expected a positive time step [s], got {dt!r}")
        c = self.cfg
        target = max(float(target_speed), 0.0) if math.isfinite(target_speed) else 0.0
        error = target - float(speed)
        deriv = 0.0 if self._prev_error is None else (error - self._prev_error) / dt
        self._prev_error = error
        candidate = float(np.clip(self.integral + error * dt, -c.integral_limit, c.integral_limit))
        u_unclamped = c.kp * error + c.ki * candidate + c.kd * deriv
        u = float(np.clip(u_unclamped, -1.0, 1.0))
        saturated_high = u_unclamped >= c.max_throttle and error > 0
        saturated_low = u_unclamped <= -c.max_brake and error < 0
        if not (saturated_high or saturated_low):
            self.integral = candidate
        if u > 0.0:
            return min(u, c.max_throttle), 0.0
        if u < -c.brake_deadband:
            return 0.0, min(-u, c.max_brake)
        return 0.0, 0.0


# ------------------------------------------------------------------------------------------- lateral
@dataclass(frozen=True)
class LateralConfig:
    """Pure pursuit: lookahead ``clip(gain * speed, min, max)`` [m]; ``wheelbase`` [m];
    ``max_steer_rad`` is the road-wheel angle that CARLA's ``steer = 1`` gives at standstill;
    ``steering_curve`` holds (forward speed [km/h], factor) pairs scaling it with speed, as CARLA's
    ``VehiclePhysicsControl.steering_curve`` does (empty: factor 1). The defaults are a generic car;
    the bridge reads the ego's own values with :func:`lateral_from_physics`."""

    lookahead_gain: float = 0.8
    lookahead_min: float = 5.0
    lookahead_max: float = 25.0
    wheelbase: float = 2.9
    max_steer_rad: float = math.radians(70.0)
    steering_curve: tuple[tuple[float, float], ...] = ()

    def max_steer_at(self, speed: float) -> float:
        """Road-wheel angle [rad] of ``steer = 1`` at forward ``speed`` [m/s]: ``max_steer_rad`` times the
        steering curve at ``speed`` in km/h (linear between points, held beyond the ends)."""
        if not self.steering_curve:
            return self.max_steer_rad
        xs, ys = zip(*self.steering_curve, strict=True)
        return self.max_steer_rad * float(np.interp(abs(speed) * 3.6, xs, ys))


#: Plausible ranges of what :func:`lateral_from_physics` reads [m], [deg].
WHEELBASE_RANGE = (0.5, 10.0)
MAX_STEER_RANGE_DEG = (1.0, 90.0)


def lateral_from_physics(physics: Any, base: LateralConfig | None = None) -> LateralConfig:
    """:class:`LateralConfig` with a vehicle's steering geometry from its ``carla.VehiclePhysicsControl``.

    * ``wheels`` (``carla.WheelPhysicsControl``): the front wheels are the steered ones
      (``max_steer_angle`` > 0) when some are and some are not, else the first half of the list (CARLA
      orders them front-left, front-right, rear-left, rear-right). The wheelbase is the distance between
      the front and rear axle centres; ``position`` is in centimetres in world coordinates, so only
      differences are used. ``max_steer_rad`` is the largest front ``max_steer_angle`` [deg].
    * ``steering_curve`` (``carla.Vector2D`` of speed [km/h], factor) is kept as is.

    Raises ValueError naming the value when fewer than two wheels are given or the wheelbase or steer
    angle is outside :data:`WHEELBASE_RANGE` / :data:`MAX_STEER_RANGE_DEG`.
    """
    c = base or LateralConfig()
    wheels = list(physics.wheels)
    if len(wheels) < 2:
        raise ValueError(f"physics.wheels: expected at least 2 wheels, got {len(wheels)}")
    steered = [w for w in wheels if float(w.max_steer_angle) > 0.0]
    fixed = [w for w in wheels if float(w.max_steer_angle) <= 0.0]
    front, rear = (steered, fixed) if steered and fixed else (wheels[:len(wheels) // 2], wheels[len(wheels) // 2:])

    def axle(ws: list[Any]) -> np.ndarray:
        return np.mean([(w.position.x, w.position.y, w.position.z) for w in ws], axis=0) / 100.0  # cm -> m

    wheelbase = float(np.linalg.norm(axle(front) - axle(rear)))
    max_steer = max(float(w.max_steer_angle) for w in front)
    if not WHEELBASE_RANGE[0] <= wheelbase <= WHEELBASE_RANGE[1]:
        raise ValueError(f"physics.wheels: wheelbase {wheelbase:.3f} m from the wheel positions is outside "
                         f"{WHEELBASE_RANGE[0]:g}..{WHEELBASE_RANGE[1]:g} m")
    if not MAX_STEER_RANGE_DEG[0] <= max_steer <= MAX_STEER_RANGE_DEG[1]:
        raise ValueError(f"physics.wheels: front max_steer_angle {max_steer:g} deg is outside "
                         f"{MAX_STEER_RANGE_DEG[0]:g}..{MAX_STEER_RANGE_DEG[1]:g} deg")
    curve = tuple((float(p.x), float(p.y)) for p in getattr(physics, "steering_curve", ()))
    if curve and any(b[0] <= a[0] for a, b in itertools.pairwise(curve)):
        raise ValueError(f"physics.steering_curve: speeds must increase, got {[p[0] for p in curve]}")
    return replace(c, wheelbase=wheelbase, max_steer_rad=math.radians(max_steer), steering_curve=curve)


def pure_pursuit_steer(path_xy: np.ndarray, speed: float, cfg: LateralConfig | None = None) -> float:
    """Road-wheel angle [rad, + = left] that steers ``base_link`` onto ``path_xy``.

    ``path_xy`` (N, 2) holds lane centre points in ``base_link`` (metres), in driving order. The goal
    is the first point ahead (x > 0) at least one lookahead away (the farthest one if none is);
    ``delta = atan(2 L sin(alpha) / d)`` with ``alpha`` the goal's bearing and ``d`` its distance.
    Returns 0 when no point lies ahead.
    """
    c = cfg or LateralConfig()
    pts = np.asarray(path_xy, np.float64).reshape(-1, 2)
    ahead = pts[pts[:, 0] > 0.5]
    if len(ahead) == 0:
        return 0.0
    lookahead = float(np.clip(c.lookahead_gain * max(speed, 0.0), c.lookahead_min, c.lookahead_max))
    dist = np.hypot(ahead[:, 0], ahead[:, 1])
    far = np.nonzero(dist >= lookahead)[0]
    i = int(far[0]) if len(far) else int(np.argmax(dist))
    alpha = math.atan2(ahead[i, 1], ahead[i, 0])
    return math.atan(2.0 * c.wheelbase * math.sin(alpha) / dist[i])


def steer_to_carla(delta_rad: float, max_steer_rad: float) -> float:
    """Road-wheel angle [rad, + = left, REP-103] -> CARLA ``steer`` in [-1, 1] (+ = right)."""
    return float(np.clip(-delta_rad / max_steer_rad, -1.0, 1.0))


def lateral_offset(path_xy: np.ndarray) -> float:
    """Signed distance [m, + = path is to the left] of the lane centre from ``base_link`` at x = 0
    (linear interpolation between the path points straddling x = 0; nearest point otherwise)."""
    pts = np.asarray(path_xy, np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return math.nan
    order = np.argsort(pts[:, 0])
    xs, ys = pts[order, 0], pts[order, 1]
    if xs[0] <= 0.0 <= xs[-1] and len(xs) > 1:
        return float(np.interp(0.0, xs, ys))
    return float(ys[np.argmin(np.abs(xs))])


# ---------------------------------------------------------------------------------------- controller
class LaneMap(Protocol):
    """What the controller needs from the road map (the bridge implements it with CARLA waypoints)."""

    def current_key(self) -> Hashable:
        """Identity of the lane the ego is in now (e.g. CARLA's (road_id, section_id, lane_id))."""
        ...

    def path(self, side: int) -> np.ndarray | None:
        """Centre points (N, 2) in ``base_link`` of the ego lane (``side`` 0), the neighbouring lane
        to the left (+1) or right (-1) ahead of the ego; None when that lane is not a drivable lane
        of the same direction that may be changed into."""
        ...


@dataclass(frozen=True)
class ControlConfig:
    """``max_assessment_age`` [s]: older assessments count as missing (autopilot fallback);
    ``lane_change_timeout`` [s]: a change not finished by then is aborted."""

    pid: PidConfig = field(default_factory=PidConfig)
    lateral: LateralConfig = field(default_factory=LateralConfig)
    max_assessment_age: float = 0.5
    lane_change_timeout: float = 8.0


@dataclass(frozen=True)
class ControlCommand:
    """One control decision. ``mode``: ``pipeline`` (apply throttle/steer/brake), ``stop`` (hard
    brake) or ``autopilot`` (hand the car to the Traffic Manager; the other fields are unused).
    ``steer`` follows CARLA (+ = right). ``lane_change`` is +1/-1 while changing left/right, else 0."""

    mode: str
    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0
    hand_brake: bool = False
    target_speed: float = 0.0
    lane_change: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Intervention:
    """A logged control event: sim time [s], kind, free text."""

    stamp: float
    kind: str
    detail: str


#: Action -> lane side it asks for.
_LANE_SIDE = {Action.CHANGE_LANE_LEFT: 1, Action.CHANGE_LANE_RIGHT: -1}


class ClosedLoopController:
    """Assessment -> :class:`ControlCommand`, with a lane-change state machine (see module doc).

    A lane change, once started, is held until the ego's lane identity changes (it crossed into the
    new lane), the neighbouring lane disappears (abort) or ``lane_change_timeout`` passes (abort);
    suggestions to keep the lane in between do not cancel it (no zig-zag), a STOP does.
    """

    def __init__(self, cfg: ControlConfig | None = None) -> None:
        self.cfg = cfg or ControlConfig()
        self.pid = LongitudinalPid(self.cfg.pid)
        self.mode = "init"
        self.events: list[Intervention] = []
        self._change_side = 0
        self._change_from: Hashable | None = None
        self._change_start = 0.0

    def _event(self, stamp: float, kind: str, detail: str) -> None:
        self.events.append(Intervention(stamp, kind, detail))
        log.info("control t=%.2f %s: %s", stamp, kind, detail)

    def _set_mode(self, stamp: float, mode: str, why: str) -> None:
        if mode != self.mode:
            self._event(stamp, f"mode:{mode}", why)
            self.mode = mode

    def step(self, assessment: Any | None, now: float, speed: float, dt: float, lanes: LaneMap) -> ControlCommand:
        """One decision at sim time ``now`` [s] for ego ``speed`` [m/s], control period ``dt`` [s].

        ``assessment`` is duck-typed on ``valid``, ``stamp``, ``action``, ``target_speed`` and
        ``rationale`` (an :class:`~lmm_fusion.cycle.assessment.Assessment`), or None.
        """
        c = self.cfg
        usable = (assessment is not None and bool(getattr(assessment, "valid", False))
                  and now - float(assessment.stamp) <= c.max_assessment_age)
        if assessment is None or not usable:  # the None test is implied by usable; it narrows the type
            why = ("no assessment" if assessment is None else
                   "invalid assessment" if not assessment.valid else
                   f"stale assessment ({now - float(assessment.stamp):.2f} s old)")
            self._set_mode(now, "autopilot", f"{why}: Traffic Manager drives")
            self.pid.reset()
            self._cancel_change(now, "abort", "hand-over to the Traffic Manager")
            return ControlCommand("autopilot", reason=why)
        action = Action(int(assessment.action))
        if action == Action.STOP:
            if self.mode != "stop":
                self._event(now, "hard_brake", f"STOP at {speed:.1f} m/s: {getattr(assessment, 'rationale', '')}")
            self._set_mode(now, "stop", "suggestion is STOP")
            self.pid.reset()
            self._cancel_change(now, "abort", "STOP")
            return ControlCommand("stop", brake=1.0, target_speed=0.0, reason="STOP")
        self._set_mode(now, "pipeline", f"following the suggestion ({action.name})")
        side = _LANE_SIDE.get(action, 0)
        if side and self._change_side == 0:
            self._start_change(now, side, lanes)
        path = self._lane_path(now, lanes)
        target = float(assessment.target_speed)
        throttle, brake = self.pid.step(target, speed, dt)
        steer = 0.0
        if path is not None and len(path):
            steer = steer_to_carla(pure_pursuit_steer(path, speed, c.lateral), c.lateral.max_steer_at(speed))
        return ControlCommand("pipeline", throttle=throttle, steer=steer, brake=brake, target_speed=target,
                              lane_change=self._change_side, reason=action.name)

    def _start_change(self, now: float, side: int, lanes: LaneMap) -> None:
        name = "left" if side > 0 else "right"
        if lanes.path(side) is None:
            self._event(now, "lane_change_refused", f"no drivable {name} lane to change into")
            return
        self._change_side = side
        self._change_from = lanes.current_key()
        self._change_start = now
        self._event(now, "lane_change_start", f"changing {name} from lane {self._change_from}")

    def _cancel_change(self, now: float, kind: str, why: str) -> None:
        if self._change_side:
            self._event(now, f"lane_change_{kind}", why)
            self._change_side = 0
            self._change_from = None

    def _lane_path(self, now: float, lanes: LaneMap) -> np.ndarray | None:
        """Path to follow: the target lane while changing, else the ego lane."""
        if self._change_side:
            if lanes.current_key() != self._change_from:
                self._cancel_change(now, "done", f"now in lane {lanes.current_key()}")
            elif now - self._change_start > self.cfg.lane_change_timeout:
                self._cancel_change(now, "abort", f"not finished within {self.cfg.lane_change_timeout:g} s")
            else:
                target = lanes.path(self._change_side)
                if target is not None:
                    return target
                self._cancel_change(now, "abort", "neighbouring lane ended")
        return lanes.path(0)
