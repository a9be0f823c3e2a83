"""Closed-loop control: PID on a simple vehicle model, pure pursuit, lane-change state machine."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import pytest

from lmm_fusion.base.vocabulary import Action
from lmm_fusion.carla.control import (
    ClosedLoopController,
    ControlConfig,
    LateralConfig,
    LongitudinalPid,
    PidConfig,
    lateral_from_physics,
    lateral_offset,
    pure_pursuit_steer,
    steer_to_carla,
)

DT = 0.05


def plant(v: float, throttle: float, brake: float, dt: float = DT) -> float:
    """Point-mass car: 4 m/s^2 at full throttle, 8 m/s^2 at full brake, drag and rolling resistance."""
    a = 4.0 * throttle - 8.0 * brake - 4e-4 * v * v - (0.15 if v > 0 else 0.0)
    return max(v + a * dt, 0.0)


def drive(pid: LongitudinalPid, target: float, v0: float, seconds: float) -> np.ndarray:
    v, out = v0, []
    for _ in range(round(seconds / DT)):
        th, br = pid.step(target, v, DT)
        assert 0.0 <= th <= 1.0 and 0.0 <= br <= 1.0 and not (th > 0 and br > 0)
        v = plant(v, th, br)
        out.append(v)
    return np.array(out)


@pytest.mark.parametrize("target", [5.0, 15.0, 25.0])
def test_pid_converges_without_large_overshoot(target: float) -> None:
    v = drive(LongitudinalPid(), target, 0.0, 40.0)
    assert abs(v[-1] - target) < 0.02 * target
    assert v.max() < target * 1.05
    settled = np.nonzero(np.abs(v - target) > 0.05 * target)[0].max() * DT
    assert settled < 15.0


def test_pid_slows_down_with_brake() -> None:
    pid = LongitudinalPid()
    th, br = pid.step(5.0, 20.0, DT)
    assert th == 0.0 and br > 0.5
    v = drive(pid, 5.0, 20.0, 30.0)
    assert abs(v[-1] - 5.0) < 0.1 and v.min() > 4.0


def test_pid_no_windup_while_saturated() -> None:
    pid = LongitudinalPid()
    for _ in range(round(20.0 / DT)):  # car held at 0 m/s (e.g. blocked) while asked for 20 m/s
        th, _ = pid.step(20.0, 0.0, DT)
        assert th == pid.cfg.max_throttle
    assert abs(pid.integral) <= pid.cfg.integral_limit
    held = pid.integral
    v = drive(pid, 10.0, 0.0, 30.0)  # released with a lower target: no overshoot from a wound-up integral
    assert v.max() < 10.5 and abs(v[-1] - 10.0) < 0.1
    # The same scenario without anti-windup (a huge limit and integration always on) overshoots.
    naive = LongitudinalPid(PidConfig(integral_limit=1e9))
    naive.step = _naive_step(naive)  # type: ignore[method-assign]
    for _ in range(round(20.0 / DT)):
        naive.step(20.0, 0.0, DT)
    assert naive.integral > 100 * max(abs(held), 1e-3)
    assert drive(naive, 10.0, 0.0, 30.0).max() > 12.0


def _naive_step(pid: LongitudinalPid):  # type: ignore[no-untyped-def]
    c = pid.cfg

    def step(target: float, speed: float, dt: float) -> tuple[float, float]:
        e = target - speed
        pid.integral += e * dt
        u = float(np.clip(c.kp * e + c.ki * pid.integral, -1, 1))
        return (min(u, c.max_throttle), 0.0) if u > 0 else (0.0, min(-u, c.max_brake) if u < -c.brake_deadband else 0.0)
    return step


def test_pid_rejects_bad_dt() -> None:
    with pytest.raises(ValueError, match="dt"):
        LongitudinalPid().step(1.0, 0.0, 0.0)


def test_pure_pursuit_geometry() -> None:
    straight = np.stack([np.arange(-2.0, 40.0, 1.0), np.zeros(42)], axis=1)
    assert pure_pursuit_steer(straight, 10.0) == pytest.approx(0.0)
    left = straight + np.array([0.0, 2.0])  # lane centre 2 m to the left -> steer left (+)
    d = pure_pursuit_steer(left, 8.0, LateralConfig(lookahead_gain=1.0, lookahead_min=8.0))
    # lookahead 8 m -> goal (8, 2), the first point at least 8 m away; delta = atan(2 L sin(alpha) / |goal|)
    goal = math.hypot(8.0, 2.0)
    assert d == pytest.approx(math.atan(2 * 2.9 * math.sin(math.atan2(2.0, 8.0)) / goal), rel=1e-6)
    assert steer_to_carla(d, math.radians(70)) < 0  # CARLA: negative steer = left
    assert steer_to_carla(5.0, 1.0) == -1.0 and steer_to_carla(-5.0, 1.0) == 1.0  # clipped
    assert pure_pursuit_steer(np.array([[-5.0, 1.0]]), 5.0) == 0.0
    assert lateral_offset(left) == pytest.approx(2.0)


def test_pure_pursuit_tracks_lane_on_kinematic_bicycle() -> None:
    # A bicycle model starting 1.5 m right of a straight lane converges onto it.
    cfg = LateralConfig()
    x, y, yaw, v = 0.0, -1.5, 0.0, 12.0
    for _ in range(round(10.0 / DT)):
        xs = np.arange(x - 2.0, x + 60.0, 2.0)
        c, s = math.cos(yaw), math.sin(yaw)
        dx, dy = xs - x, -y
        path_base = np.stack([c * dx + s * dy, -s * dx + c * dy], axis=1)
        delta = pure_pursuit_steer(path_base, v, cfg)
        x += v * math.cos(yaw) * DT
        y += v * math.sin(yaw) * DT
        yaw += v / cfg.wheelbase * math.tan(delta) * DT
    assert abs(y) < 0.1 and abs(yaw) < 0.02


@dataclass
class Assess:
    """Duck-typed stand-in for an Assessment (the fields the controller reads)."""

    stamp: float
    action: Action
    target_speed: float = 10.0
    valid: bool = True
    rationale: str = ""


class FakeLanes:
    """Straight road; lanes at y = 0 (ego), +3.5 (left); ``key`` changes when the ego crosses."""

    def __init__(self, left: bool = True, right: bool = False) -> None:
        self.left, self.right, self.key = left, right, ("road", -1)

    def current_key(self) -> tuple[str, int]:
        return self.key

    def path(self, side: int) -> np.ndarray | None:
        if (side > 0 and not self.left) or (side < 0 and not self.right):
            return None
        xs = np.arange(-2.0, 50.0, 2.0)
        return np.stack([xs, np.full_like(xs, 3.5 * side)], axis=1)


def test_controller_modes_and_interventions() -> None:
    ctl = ClosedLoopController()
    lanes = FakeLanes()
    cmd = ctl.step(None, 0.0, 0.0, DT, lanes)
    assert cmd.mode == "autopilot"
    cmd = ctl.step(Assess(0.1, Action.KEEP_LANE, 12.0), 0.1, 5.0, DT, lanes)
    assert cmd.mode == "pipeline" and cmd.throttle > 0 and cmd.brake == 0 and cmd.steer == pytest.approx(0.0)
    cmd = ctl.step(Assess(0.2, Action.STOP, 0.0, rationale="obstacle"), 0.2, 12.0, DT, lanes)
    assert (cmd.mode, cmd.throttle, cmd.brake) == ("stop", 0.0, 1.0)
    assert ctl.pid.integral == 0.0
    cmd = ctl.step(Assess(0.1, Action.KEEP_LANE), 1.0, 5.0, DT, lanes)  # 0.9 s old: stale
    assert cmd.mode == "autopilot"
    cmd = ctl.step(Assess(1.1, Action.KEEP_LANE, valid=False), 1.1, 5.0, DT, lanes)
    assert cmd.mode == "autopilot" and "invalid" in cmd.reason
    kinds = [e.kind for e in ctl.events]
    assert kinds == ["mode:autopilot", "mode:pipeline", "hard_brake", "mode:stop", "mode:autopilot"]


def test_controller_lane_change_left() -> None:
    ctl = ClosedLoopController()
    lanes = FakeLanes(left=True)
    cmd = ctl.step(Assess(0.0, Action.CHANGE_LANE_LEFT, 10.0), 0.0, 10.0, DT, lanes)
    assert cmd.lane_change == 1 and cmd.steer < 0  # left in CARLA's convention
    # a KEEP_LANE suggestion mid-change does not cancel it
    cmd = ctl.step(Assess(0.05, Action.KEEP_LANE, 10.0), 0.05, 10.0, DT, lanes)
    assert cmd.lane_change == 1 and cmd.steer < 0
    lanes.key = ("road", -2)  # the ego crossed into the left lane
    cmd = ctl.step(Assess(0.1, Action.KEEP_LANE, 10.0), 0.1, 10.0, DT, lanes)
    assert cmd.lane_change == 0
    assert [e.kind for e in ctl.events][-2:] == ["lane_change_start", "lane_change_done"]


def test_controller_lane_change_refused_and_timeout() -> None:
    ctl = ClosedLoopController()
    lanes = FakeLanes(left=False)
    cmd = ctl.step(Assess(0.0, Action.CHANGE_LANE_LEFT), 0.0, 10.0, DT, lanes)
    assert cmd.lane_change == 0 and cmd.steer == pytest.approx(0.0)
    assert ctl.events[-1].kind == "lane_change_refused"
    lanes = FakeLanes(right=True)
    ctl.step(Assess(0.0, Action.CHANGE_LANE_RIGHT), 0.0, 10.0, DT, lanes)
    t = ctl.cfg.lane_change_timeout + 0.5
    cmd = ctl.step(Assess(t, Action.KEEP_LANE), t, 10.0, DT, lanes)
    assert cmd.lane_change == 0 and ctl.events[-1].kind == "lane_change_abort"


def test_closed_loop_follows_suggested_speed_and_stops() -> None:
    ctl = ClosedLoopController()
    lanes = FakeLanes()
    v, t = 0.0, 0.0
    for _ in range(round(20.0 / DT)):
        cmd = ctl.step(Assess(t, Action.FOLLOW, 8.0), t, v, DT, lanes)
        v = plant(v, cmd.throttle, cmd.brake)
        t += DT
    assert abs(v - 8.0) < 0.2
    stopped_after = None
    for i in range(round(5.0 / DT)):
        cmd = ctl.step(Assess(t, Action.STOP, 8.0), t, v, DT, lanes)
        v = plant(v, cmd.throttle, cmd.brake)
        t += DT
        if v == 0.0 and stopped_after is None:
            stopped_after = i * DT
    assert stopped_after is not None and stopped_after < 1.5  # 8 m/s at ~8 m/s^2


# ------------------------------------------------------------------------- steering from the vehicle
@dataclass
class V3:
    x: float
    y: float
    z: float = 0.0


@dataclass
class Wheel:
    """Duck-typed ``carla.WheelPhysicsControl``: position in cm, world coordinates."""

    max_steer_angle: float
    position: V3


@dataclass
class Physics:
    wheels: list[Wheel]
    steering_curve: tuple[V3, ...] = ()


def _wheels(front_x: float, rear_x: float, steer: float, rear_steer: float = 0.0, yaw_deg: float = 0.0) -> list[Wheel]:
    """Four wheels in CARLA's order (FL, FR, RL, RR), 80 cm either side, the car yawed by ``yaw_deg``
    at world position (1000 m, -200 m) [cm below]."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    out = []
    corners = ((front_x, -80.0, steer), (front_x, 80.0, steer), (rear_x, -80.0, rear_steer), (rear_x, 80.0, rear_steer))
    for x, y, a in corners:
        out.append(Wheel(a, V3(100_000.0 + c * x - s * y, -20_000.0 + s * x + c * y, 35.0)))
    return out


def test_lateral_from_physics_reads_wheelbase_and_steer_angle() -> None:
    cfg = lateral_from_physics(Physics(_wheels(150.0, -135.0, 48.0, yaw_deg=37.0)))
    assert cfg.wheelbase == pytest.approx(2.85, abs=1e-9)
    assert cfg.max_steer_rad == pytest.approx(math.radians(48.0))
    assert cfg.lookahead_min == LateralConfig().lookahead_min  # the rest of the config is kept
    # all wheels steered (or none): CARLA's order, front first
    cfg = lateral_from_physics(Physics(_wheels(140.0, -130.0, 40.0, rear_steer=10.0)))
    assert cfg.wheelbase == pytest.approx(2.7) and cfg.max_steer_rad == pytest.approx(math.radians(40.0))
    # the steering curve scales the angle with speed (km/h), held beyond its ends
    cfg = lateral_from_physics(Physics(_wheels(150.0, -135.0, 60.0),
                                       (V3(0.0, 1.0), V3(20.0, 0.9), V3(60.0, 0.8), V3(120.0, 0.7))))
    assert cfg.max_steer_at(0.0) == pytest.approx(math.radians(60.0))
    assert cfg.max_steer_at(40.0 / 3.6) == pytest.approx(math.radians(60.0) * 0.85)
    assert cfg.max_steer_at(200.0 / 3.6) == pytest.approx(math.radians(60.0) * 0.7)


@pytest.mark.parametrize(("physics", "needle"), [
    (Physics(_wheels(150.0, -135.0, 48.0)[:1]), "at least 2"),
    (Physics(_wheels(0.0, 0.0, 48.0)), "wheelbase"),  # positions not filled in (all at one point)
    (Physics(_wheels(150.0, -135.0, 0.0)), "max_steer_angle"),
    (Physics(_wheels(150.0, -135.0, 40.0), (V3(20.0, 1.0), V3(10.0, 0.9))), "increase"),
])
def test_lateral_from_physics_rejects_implausible(physics: Physics, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        lateral_from_physics(physics)


@pytest.mark.skipif(importlib.util.find_spec("carla") is None, reason="carla client (carla==0.9.16) not installed")
def test_lateral_from_real_physics_control() -> None:
    import carla

    # a physics control as the server returns it: positions in cm, world frame (car at x=-3000 m, yawed 90 deg)
    wheels = [carla.WheelPhysicsControl(max_steer_angle=a, position=carla.Vector3D(x=-300_000.0 + y, y=x, z=40.0))
              for a, x, y in ((55.0, 160.0, -85.0), (55.0, 160.0, 85.0), (0.0, -120.0, -85.0), (0.0, -120.0, 85.0))]
    physics = carla.VehiclePhysicsControl(wheels=wheels, steering_curve=[carla.Vector2D(0.0, 1.0),
                                                                          carla.Vector2D(100.0, 0.5)])
    cfg = lateral_from_physics(physics)
    assert cfg.wheelbase == pytest.approx(2.8, abs=1e-6)
    assert cfg.max_steer_rad == pytest.approx(math.radians(55.0))
    assert cfg.steering_curve == ((0.0, 1.0), (100.0, 0.5))
    # the controller steers with it: the same lane, the vehicle's geometry, a proportionally larger command
    ctl_default = ClosedLoopController()
    ctl_vehicle = ClosedLoopController(ControlConfig(lateral=cfg))
    lanes = FakeLanes()
    bend = np.stack([np.arange(-2.0, 40.0, 2.0), 0.004 * np.arange(-2.0, 40.0, 2.0) ** 2], axis=1)
    lanes.path = lambda side: bend if side == 0 else None  # type: ignore[method-assign]
    a = Assess(stamp=0.0, action=Action.KEEP_LANE)
    d = ctl_default.step(a, 0.0, 10.0, DT, lanes).steer
    v = ctl_vehicle.step(a, 0.0, 10.0, DT, lanes).steer
    delta_default = pure_pursuit_steer(bend, 10.0, LateralConfig())
    delta_vehicle = pure_pursuit_steer(bend, 10.0, cfg)
    assert d == pytest.approx(-delta_default / math.radians(70.0))
    assert v == pytest.approx(-delta_vehicle / (math.radians(55.0) * (1.0 - 0.5 * 36.0 / 100.0)))
    assert v < d < 0.0  # a left bend: negative CARLA steer, larger for the smaller angle and wheelbase
