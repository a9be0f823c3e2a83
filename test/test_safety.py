"""Safety guard rules and assessment decoding (no ROS)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base.rig import DEFAULT_VEHICLE
from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import (
    DEGRADED_RISK_TAIL,
    MASKED_CONFIDENCE_FACTOR,
    Assessment,
    decide_risk,
    decode,
    invalid,
)
from lmm_fusion.cycle.safety import (
    RangeRate,
    SafetyConfig,
    apply_guard,
    lane_evidence,
    lane_free_distance,
    stopping_speed_cap,
)

ALL = np.array([True, True, True])
AGES = {"camera": 0.02, "lidar": 0.05, "gnss": 0.03}


def outputs(action: Action = Action.KEEP_LANE, speed: float = 15.0, ttc: float = 10.0, dist: float = 50.0,
            risk: Risk = Risk.LOW) -> dict[str, np.ndarray]:
    """Batch-1 model outputs strongly preferring ``action`` and ``risk``."""
    act = np.full((1, 6), -4.0, np.float32)
    act[0, action] = 4.0
    rl = np.full((1, 3), -4.0, np.float32)
    rl[0, risk] = 4.0
    return {"risk_logits": rl, "action_logits": act, "light_logits": np.zeros((1, 4), np.float32),
            "target_speed": np.array([speed], np.float32), "ttc": np.array([ttc], np.float32),
            "obstacle_distance": np.array([dist], np.float32),
            "occupancy_logits": np.zeros((1, 32, 64), np.float32),
            "modality_attention": np.array([[0.2, 0.5, 0.3]], np.float32)}


def decoded(mask: np.ndarray = ALL, **kw: Any) -> Assessment:
    return decode(outputs(**kw), 5.0, mask, AGES, ttc_max=10.0, distance_max=50.0)


def test_decode_caps_mean_none_and_free() -> None:
    a = decoded()
    assert a.valid and not a.degraded
    assert math.isinf(a.ttc) and math.isinf(a.distance)
    assert a.action == Action.KEEP_LANE and a.risk == Risk.LOW
    assert a.risk_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert a.action_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert a.occupancy is not None and a.occupancy.shape == (32, 64)
    assert np.allclose(a.occupancy, 0.5)
    assert sum(m.attention for m in a.modalities) == pytest.approx(1.0)


def test_decode_masked_modality_has_zero_attention_and_lower_confidence() -> None:
    full = decoded()
    a = decoded(mask=np.array([True, False, True]))
    assert a.degraded and a.masked_names() == ["lidar"]
    assert a.modalities[1].attention == 0.0
    assert sum(m.attention for m in a.modalities) == pytest.approx(1.0)
    assert a.confidence == pytest.approx(full.confidence * MASKED_CONFIDENCE_FACTOR)


def test_risk_is_arg_max_with_all_sensors_and_cautious_when_degraded() -> None:
    """With a modality masked, a higher level whose upper-tail probability reaches that modality's
    threshold wins over a more probable lower one; with every sensor the most probable level is
    reported. Without the camera (the only sensor that sees lamps) the threshold is the lowest."""
    tail = DEGRADED_RISK_TAIL
    assert 0.3 < tail["lidar"] <= 0.45 and 0.3 < tail["gnss"] <= 0.45  # the cases below are chosen for these
    assert 0.1 < tail["camera"] < 0.25
    probs = np.array([[0.5, 0.05, 0.45], [0.7, 0.2, 0.1], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0], [0.75, 0.05, 0.2]])
    all_used, no_lidar, no_camera = ALL, np.array([True, False, True]), np.array([False, True, True])
    assert decide_risk(probs, all_used).tolist() == [0, 0, 2, 0, 0]
    assert decide_risk(probs, no_lidar).tolist() == [2, 0, 2, 0, 0]
    assert decide_risk(probs, no_camera).tolist() == [2, 1, 2, 0, 2]
    assert decide_risk(probs, ~ALL).tolist() == [2, 1, 2, 0, 2]  # several masked: the lowest threshold
    per_row = np.array([all_used, no_lidar, no_lidar, no_lidar, no_lidar])
    assert decide_risk(probs, per_row).tolist() == [0, 0, 2, 0, 0]
    assert decide_risk(np.array([0.5, 0.3, 0.2]), no_lidar) == 1  # P(risk >= MEDIUM) = 0.5
    logits = np.log(np.array([[0.55, 0.1, 0.35]], np.float32))
    out = {**outputs(), "risk_logits": logits}
    assert decode(out, 5.0, ALL, AGES, 10.0, 50.0).risk == Risk.LOW
    assert decode(out, 5.0, no_lidar, AGES, 10.0, 50.0).risk == Risk.MEDIUM


def test_invalid_assessment_says_no_assessment() -> None:
    a = invalid(3.0, np.zeros(3, bool), {})
    assert not a.valid and a.degraded
    assert a.rationale.startswith("no assessment")
    assert a.action == Action.STOP and a.target_speed == 0.0
    assert apply_guard(a, 5.0, 10.0) is a


def points_at(x: float, y: float = 0.0, z: float = 1.0) -> np.ndarray:
    return np.array([[x, y, z]], np.float32)


def test_lane_free_distance_from_bumper_ignores_ground_overhead_and_side() -> None:
    cfg = SafetyConfig()
    ground = points_at(DEFAULT_VEHICLE.front_offset + 5.0, 0.0, 0.05)
    overhead = points_at(DEFAULT_VEHICLE.front_offset + 6.0, 0.0, 4.0)
    side = points_at(DEFAULT_VEHICLE.front_offset + 7.0, 3.0, 1.0)
    behind = points_at(DEFAULT_VEHICLE.front_offset - 1.0, 0.0, 1.0)
    obstacle = points_at(DEFAULT_VEHICLE.front_offset + 12.5, 0.5, 1.0)
    pts = np.concatenate([ground, overhead, side, behind, obstacle])
    assert lane_free_distance(pts, cfg) == pytest.approx(12.5, abs=1e-4)
    assert math.isinf(lane_free_distance(np.concatenate([ground, overhead, side, behind]), cfg))
    assert math.isinf(lane_free_distance(np.zeros((0, 4), np.float32), cfg))
    far = points_at(DEFAULT_VEHICLE.front_offset + cfg.max_range + 1.0)
    assert math.isinf(lane_free_distance(far, cfg))


@pytest.mark.parametrize("d", [3.0, 10.0, 25.0, 60.0])
def test_stopping_speed_cap_formula(d: float) -> None:
    cfg = SafetyConfig(decel=4.0, margin=3.0, max_speed=100.0)
    assert stopping_speed_cap(d, cfg) == pytest.approx(math.sqrt(2 * 4.0 * max(d - 3.0, 0.0)))
    assert stopping_speed_cap(math.inf, cfg) == 100.0


def test_free_lane_keeps_model_suggestion() -> None:
    a = apply_guard(decoded(speed=12.0), math.inf, 12.0)
    assert not a.safety_override
    assert a.action == Action.KEEP_LANE and a.target_speed == pytest.approx(12.0)
    assert "lane free" in a.rationale and "guard" not in a.rationale


def test_speed_capped_by_stopping_distance() -> None:
    cfg = SafetyConfig(decel=4.0, margin=3.0, ttc_stop=0.5, ttc_slow=1.0)
    a = apply_guard(decoded(action=Action.FOLLOW, speed=20.0), 15.0, 5.0, cfg)
    cap = math.sqrt(2 * 4.0 * 12.0)
    assert a.safety_override
    assert a.target_speed == pytest.approx(cap)
    assert a.action == Action.FOLLOW
    assert a.distance == pytest.approx(15.0)
    assert "obstacle 15.0 m ahead" in a.rationale and "(lidar)" in a.rationale and "capped" in a.rationale


def test_low_ttc_forces_stop() -> None:
    a = apply_guard(decoded(action=Action.KEEP_LANE, speed=20.0), 10.0, 15.0)  # TTC 0.67 s
    assert a.action == Action.STOP and a.target_speed == 0.0 and a.safety_override
    assert a.ttc == pytest.approx(10.0 / 15.0)
    assert a.rationale.startswith("stop: obstacle 10.0 m ahead, TTC 0.7 s (lidar)")
    assert "TTC < 1.5 s" in a.rationale


def test_medium_ttc_forces_slow_down_and_caps_below_ego_speed() -> None:
    cfg = SafetyConfig()
    a = apply_guard(decoded(action=Action.KEEP_LANE, speed=10.0), 40.0, 16.0, cfg)  # TTC 2.5 s
    assert a.action == Action.SLOW_DOWN and a.safety_override
    assert a.target_speed <= cfg.slow_factor * 16.0 + 1e-6


def test_model_ttc_used_without_gnss() -> None:
    a = apply_guard(decoded(action=Action.FOLLOW, speed=5.0, ttc=1.0, dist=8.0), None, None)
    assert a.action == Action.STOP and a.ttc == pytest.approx(1.0)
    assert "(model)" in a.rationale


def test_masked_modality_lowers_the_cap() -> None:
    cfg = SafetyConfig(ttc_stop=0.1, ttc_slow=0.2)
    full = apply_guard(decoded(speed=30.0), 30.0, 2.0, cfg)
    cam_masked = apply_guard(decoded(mask=np.array([False, True, True]), speed=30.0), 30.0, 2.0, cfg)
    assert cam_masked.target_speed == pytest.approx(full.target_speed * cfg.degraded_factor)
    assert "camera masked" in cam_masked.rationale
    no_lidar = apply_guard(decoded(mask=np.array([True, False, True]), speed=30.0), None, 2.0, cfg)
    assert no_lidar.target_speed <= cfg.no_lidar_speed
    assert no_lidar.safety_override and "(degraded)" in no_lidar.rationale


def test_inside_margin_stops() -> None:
    cfg = SafetyConfig(margin=3.0, ttc_stop=0.1, ttc_slow=0.2)
    a = apply_guard(decoded(action=Action.FOLLOW, speed=3.0), 2.0, 0.0, cfg)
    assert a.action == Action.STOP and a.target_speed == 0.0
    assert "inside stopping distance" in a.rationale


def test_guard_never_speeds_up() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        speed = float(rng.uniform(0, 30))
        a0 = decoded(action=Action(int(rng.integers(0, 6))), speed=speed, ttc=float(rng.uniform(0, 12)),
                     dist=float(rng.uniform(0, 60)))
        free = float(rng.uniform(0, 80)) if rng.random() < 0.8 else None
        ego = float(rng.uniform(0, 30)) if rng.random() < 0.8 else None
        a = apply_guard(a0, free, ego)
        assert a.target_speed <= a0.target_speed + 1e-6
        assert a.safety_override == (a.action != a0.action or a.target_speed < a0.target_speed - 1e-6)
        assert len(a.rationale) < 160


@pytest.mark.parametrize(("field", "value"), [("decel", 0.0), ("slow_factor", 1.5), ("ttc_stop", -1.0),
                                              ("max_height", 0.1)])
def test_config_validation_names_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SafetyConfig(**{field: value}).validate()


# ------------------------------------------------------------------ lane changes (rule 3) and closing speed
FRONT = DEFAULT_VEHICLE.front_offset
REAR = DEFAULT_VEHICLE.front_offset - DEFAULT_VEHICLE.length  # x of the rear bumper in base_link


def box(x_near: float, y: float, length: float = 4.0, width: float = 1.8, z: float = 1.0) -> np.ndarray:
    """Obstacle points of a box whose near face is ``x_near`` m ahead of the bumper, centred at ``y``."""
    # points 0.25 m apart or closer across (a LiDAR's spacing at 30 m is ~0.1 m)
    xs, ys = np.meshgrid(np.linspace(0.0, length, 9), np.linspace(-width / 2, width / 2, max(5, int(width * 4) + 1)))
    return np.stack([FRONT + x_near + xs.ravel(), y + ys.ravel(), np.full(xs.size, z)], 1).astype(np.float32)


def road(n: int = 400) -> np.ndarray:
    """Ground returns (never obstacles) around the vehicle."""
    rng = np.random.default_rng(0)
    return np.stack([rng.uniform(-20, 60, n), rng.uniform(-8, 8, n), rng.uniform(-0.05, 0.05, n)], 1)


def scene_points(*boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([road(), *boxes]).astype(np.float32)


DEFAULTS = SafetyConfig()


def guard_with(points: np.ndarray | None, action: Action, ego: float | None, cfg: SafetyConfig = DEFAULTS,
               speed: float = 8.0, closing: float | None = None, mask: np.ndarray = ALL) -> Assessment:
    lanes = None if points is None else lane_evidence(points, cfg)
    free = None if lanes is None else lanes.free_distance
    return apply_guard(decoded(mask=mask, action=action, speed=speed), free, ego, cfg, lanes, closing=closing)


def test_lane_evidence_sorts_points_into_the_lanes_beside() -> None:
    cfg = SafetyConfig()
    ev = lane_evidence(scene_points(box(20.0, 0.0, length=4.0), box(-3.0, 3.5), box(30.0, -3.5), box(10.0, 7.0)), cfg)
    assert ev.free_distance == pytest.approx(20.0, abs=1e-3)
    assert ev.obstacle_far == pytest.approx(24.0, abs=1e-3)  # its points reach 4 m deep
    assert ev.left.min() == pytest.approx(-3.0, abs=1e-3) and ev.right.min() == pytest.approx(30.0, abs=1e-3)
    assert (ev.left < 10.0).all()  # the car two lanes over (y = 7 m) is in neither corridor
    assert ev.rear == pytest.approx(-DEFAULT_VEHICLE.length)
    empty = lane_evidence(np.zeros((0, 3), np.float32), cfg)
    assert math.isinf(empty.free_distance) and empty.left.size == 0


def test_allowed_lane_change_around_a_stopped_obstacle_at_standstill() -> None:
    """The vehicle stands 2.5 m behind a stopped car, the left lane is free: the change stands (the ego-lane
    stopping distance does not turn it into STOP), where a proposal to keep the lane still stops."""
    pts = scene_points(box(2.5, 0.0))
    a = guard_with(pts, Action.CHANGE_LANE_LEFT, 0.0, speed=3.0)
    assert a.action == Action.CHANGE_LANE_LEFT and not a.safety_override
    assert "left lane free" in a.rationale and "guard" not in a.rationale
    keep = guard_with(pts, Action.KEEP_LANE, 0.0, speed=3.0)
    assert keep.action == Action.STOP and "inside stopping distance" in keep.rationale


@pytest.mark.parametrize(("blocker", "why"), [
    (box(28.0, 3.5), "occupied 28.0 m ahead"),  # beside the obstacle
    (box(REAR - FRONT - 7.0, 3.3, length=3.0), "occupied 7.0 m behind the rear"),  # within 8 m
    (box(44.0, 3.4), "occupied 44.0 m ahead"),  # within 10 m beyond the obstacle's far face (29 m + 10 m)
])
def test_blocked_lane_change_is_refused_slowing_or_stopping_as_the_policy_does(blocker: np.ndarray, why: str
                                                                                 ) -> None:
    cfg = SafetyConfig()
    pts = scene_points(box(30.0, 0.0, length=4.0), blocker)
    # 10 m/s: comfortable stop 0.5 * 10 + 100 / 6 = 21.7 m, + 8 m margin = 29.7 m < 30 m -> slow down
    a = guard_with(pts, Action.CHANGE_LANE_LEFT, 10.0, cfg, speed=10.0, closing=10.0)
    assert a.action == Action.SLOW_DOWN and a.safety_override
    assert a.target_speed <= math.sqrt(2 * cfg.comfort_decel * (30.0 - cfg.blocked_stop_margin)) + 1e-6
    assert f"left lane {why}" in a.rationale and "[guard:" in a.rationale
    # faster: the comfortable stop no longer fits before the obstacle -> stop (TTC 30 / 12 = 2.5 s > 1.5 s)
    fast = guard_with(pts, Action.CHANGE_LANE_LEFT, 12.0, cfg, speed=12.0, closing=12.0)
    assert fast.action == Action.STOP and fast.target_speed == 0.0


def test_lane_change_stretch_ends_where_the_policy_s_does() -> None:
    """Free: a car 9 m behind the rear bumper, one 11 m beyond the obstacle's far face, one two lanes over,
    ground points; the obstacle's own width inside the ego lane."""
    pts = scene_points(box(30.0, 0.0, length=4.0), box(REAR - FRONT - 9.0 - 4.0, 3.5), box(45.5, 3.5),
                       box(20.0, 7.2))
    a = guard_with(pts, Action.CHANGE_LANE_LEFT, 10.0, speed=10.0, closing=10.0)
    assert a.action == Action.CHANGE_LANE_LEFT, a.rationale
    # The right lane was never looked at for a left change; a right change is checked on its own side.
    right = guard_with(scene_points(box(30.0, 0.0), box(31.0, -3.5)), Action.CHANGE_LANE_RIGHT, 10.0, speed=10.0,
                       closing=10.0)
    assert right.action == Action.SLOW_DOWN and "right lane occupied" in right.rationale


def test_short_obstacle_counts_at_least_obstacle_length() -> None:
    """LiDAR sees only the near face of a low box: the stretch runs from its near face + obstacle_length."""
    cfg = SafetyConfig(obstacle_length=5.0, lane_free_beyond=10.0)
    near_face = box(30.0, 0.0, length=0.2, z=0.5)
    assert guard_with(scene_points(near_face, box(44.0, 3.5)), Action.CHANGE_LANE_LEFT, 10.0, cfg, speed=10.0,
                      closing=10.0).action == Action.SLOW_DOWN  # 44 < 30 + 5 + 10
    assert guard_with(scene_points(near_face, box(45.5, 3.5)), Action.CHANGE_LANE_LEFT, 10.0, cfg, speed=10.0,
                      closing=10.0).action == Action.CHANGE_LANE_LEFT


def test_lane_change_into_an_occupied_lane_on_a_free_road_keeps_the_lane() -> None:
    a = guard_with(scene_points(box(5.0, 3.5)), Action.CHANGE_LANE_LEFT, 10.0, speed=10.0)
    assert a.action == Action.KEEP_LANE and a.safety_override and "left lane occupied 5.0 m ahead" in a.rationale
    free = guard_with(scene_points(box(35.0, 3.5)), Action.CHANGE_LANE_LEFT, 10.0, speed=10.0)
    assert free.action == Action.CHANGE_LANE_LEFT  # beyond lane_free_ahead (30 m)
    assert free.target_speed == pytest.approx(10.0)  # 35 m of room allow sqrt(2 * 4 * 32) = 16 m/s


def test_lane_change_without_lidar_is_not_verified() -> None:
    no_lidar = np.array([True, False, True])
    a = guard_with(None, Action.CHANGE_LANE_RIGHT, 5.0, speed=5.0, mask=no_lidar)
    assert a.action == Action.KEEP_LANE and "right lane not verified (no lidar)" in a.rationale
    assert a.target_speed <= SafetyConfig().no_lidar_speed
    # the model's obstacle (8 m, nothing measured) and no GNSS: the stopping distance at max_speed -> stop
    b = apply_guard(decoded(mask=np.array([True, False, False]), action=Action.CHANGE_LANE_LEFT, speed=5.0,
                            dist=20.0), None, None)
    assert b.action == Action.STOP


def test_unsafe_cases_still_caught_with_lanes() -> None:
    """A lane change with no time to steer out stops; so does keeping the lane into a stopped car."""
    pts = scene_points(box(10.0, 0.0))
    a = guard_with(pts, Action.CHANGE_LANE_LEFT, 15.0, speed=15.0, closing=15.0)  # TTC 0.67 s
    assert a.action == Action.STOP and "TTC < 1.5 s" in a.rationale
    keep = guard_with(scene_points(box(40.0, 0.0)), Action.KEEP_LANE, 12.0, speed=12.0, closing=12.0)  # 3.3 s
    assert keep.action == Action.SLOW_DOWN and keep.target_speed <= 0.7 * 12.0 + 1e-6


def test_measured_closing_speed_replaces_the_stopped_obstacle_assumption() -> None:
    """A lead 12 m ahead at 12 m/s ego speed: 1 s as if it stood still (stop), but it drives at 11 m/s
    (closing 1 m/s: TTC 12 s), so the model's FOLLOW stands; unmeasured, the guard still stops."""
    pts = scene_points(box(12.0, 0.0))
    unknown = guard_with(pts, Action.FOLLOW, 12.0, speed=11.0)
    assert unknown.action == Action.STOP and unknown.ttc == pytest.approx(1.0, abs=1e-3)
    measured = guard_with(pts, Action.FOLLOW, 12.0, speed=11.0, closing=1.0)
    assert measured.action == Action.FOLLOW and measured.ttc == pytest.approx(12.0, abs=1e-3)
    receding = guard_with(pts, Action.FOLLOW, 12.0, speed=11.0, closing=-2.0)
    assert math.isinf(receding.ttc) or receding.ttc > 10.0
    # The model's own TTC still counts.
    lanes = lane_evidence(pts)
    low = apply_guard(decoded(action=Action.FOLLOW, speed=11.0, ttc=1.0, dist=12.0), lanes.free_distance, 12.0,
                      SafetyConfig(), lanes, closing=1.0)
    assert low.action == Action.STOP


def test_range_rate_fits_a_line_and_restarts_on_a_jump() -> None:
    cfg = SafetyConfig(closing_window=0.5, closing_jump=1.0)
    rr = RangeRate()
    assert rr.update(0.0, 30.0, cfg) is None and rr.update(0.1, 29.5, cfg) is None  # too few frames
    for i in range(2, 8):
        closing = rr.update(0.1 * i, 30.0 - 5.0 * 0.1 * i, cfg)
    assert closing == pytest.approx(5.0, abs=1e-6)
    assert rr.update(0.7, 1.0, cfg) == closing  # the same frame again changes nothing
    assert rr.update(0.8, 20.0, cfg) is None  # 6 m nearer than the line: a new obstacle (cut-in)
    assert rr.update(0.9, math.inf, cfg) is None and rr.closing is None  # lane free: unknown
    assert rr.update(None, 10.0, cfg) is None


def test_rationale_of_lane_decisions_stays_short() -> None:
    pts = scene_points(box(30.0, 0.0), box(31.0, 3.5))
    for action in (Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT):
        a = guard_with(pts, action, 10.0, speed=10.0, mask=np.array([False, True, True]))
        assert len(a.rationale) < 160, a.rationale


@pytest.mark.parametrize(("field", "value"), [("lane_width", 0.0), ("lane_intrusion", 2.0), ("closing_window", 0.0),
                                              ("blocked_stop_margin", -1.0), ("comfort_decel", float("nan"))])
def test_lane_config_validation_names_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SafetyConfig(**{field: value}).validate()


def test_guard_with_lanes_never_speeds_up_and_explains_every_override() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        boxes = [box(float(rng.uniform(-20, 60)), float(rng.choice([0.0, 3.5, -3.5, 7.0]))) for _ in range(3)]
        pts = scene_points(*boxes) if rng.random() < 0.9 else None
        a0 = decoded(action=Action(int(rng.integers(0, 6))), speed=float(rng.uniform(0, 30)),
                     ttc=float(rng.uniform(0, 12)), dist=float(rng.uniform(0, 60)))
        ego = float(rng.uniform(0, 30)) if rng.random() < 0.8 else None
        closing = float(rng.uniform(-5, 30)) if rng.random() < 0.7 else None
        lanes = None if pts is None else lane_evidence(pts)
        a = apply_guard(a0, None if lanes is None else lanes.free_distance, ego, SafetyConfig(), lanes,
                        closing=closing)
        assert a.target_speed <= a0.target_speed + 1e-6
        assert a.safety_override == (a.action != a0.action or a.target_speed < a0.target_speed - 1e-6)
        assert a.safety_override == ("[guard:" in a.rationale)
        assert len(a.rationale) < 160
        if a.action in (Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT):
            assert a.action == a0.action and lanes is not None  # never invented, never unverified


def test_stopping_cap_counts_a_measured_lead_speed() -> None:
    cfg = SafetyConfig(decel=4.0, margin=3.0, max_speed=100.0)
    assert stopping_speed_cap(2.0, cfg, 8.5) == pytest.approx(math.sqrt(2 * 4.0 * (2.0 - 3.0) + 8.5**2))
    assert stopping_speed_cap(2.0, cfg) == 0.0 and stopping_speed_cap(2.0, cfg, 1.0) == 0.0
    # A lead 2 m ahead driving 8.6 m/s (ego 9 m/s, closing 0.4 m/s measured: TTC 5 s): slow down behind it,
    # capped at sqrt(2 * 4 * (2 - 3) + 8.6^2) = 8.1 m/s, no stop.
    pts = scene_points(box(2.0, 0.0))
    followed = guard_with(pts, Action.SLOW_DOWN, 9.0, speed=8.5, closing=0.4)
    assert followed.action == Action.SLOW_DOWN
    assert followed.target_speed == pytest.approx(math.sqrt(-8.0 + 8.6**2), abs=0.01)
    # Not measured: it may stand still -> inside the stopping distance.
    assert guard_with(pts, Action.SLOW_DOWN, 9.0, speed=8.5).action == Action.STOP


def test_lidar_distance_counts_unless_the_model_sees_something_clearly_nearer() -> None:
    cfg = SafetyConfig(margin=3.0)
    lanes = lane_evidence(scene_points(box(20.0, 0.0)), cfg)
    near = apply_guard(decoded(action=Action.FOLLOW, speed=5.0, dist=18.0), lanes.free_distance, 5.0, cfg, lanes,
                       closing=0.0)
    assert near.distance == pytest.approx(20.0, abs=1e-3) and "(lidar)" in near.rationale  # a model error of 2 m
    line = apply_guard(decoded(action=Action.SLOW_DOWN, speed=5.0, dist=12.0), lanes.free_distance, 5.0, cfg, lanes,
                       closing=0.0)
    assert line.distance == pytest.approx(12.0) and "(model)" in line.rationale  # e.g. a stop line before it


def test_the_obstacle_reaching_into_the_next_lane_does_not_block_it() -> None:
    """A wide or yawed obstacle (or one on a curve) reaching into the left corridor: its own points do not
    block the lane that passes it; a second object touching it (a span wider than one object) does."""
    wide = box(30.0, 1.5, length=3.0, width=2.4)  # y 0.3 .. 2.7
    ev = lane_evidence(scene_points(wide))
    assert ev.left.size == 0 and ev.free_distance == pytest.approx(30.0, abs=1e-3)
    assert guard_with(scene_points(wide), Action.CHANGE_LANE_LEFT, 8.0, speed=8.0,
                      closing=8.0).action == Action.CHANGE_LANE_LEFT
    touching = box(30.0, 4.4, length=3.0, width=3.0)  # y 2.9 .. 5.9: a blocker against it
    blocked = guard_with(scene_points(wide, touching), Action.CHANGE_LANE_LEFT, 8.0, speed=8.0, closing=8.0)
    assert blocked.action in (Action.SLOW_DOWN, Action.STOP) and "left lane occupied" in blocked.rationale


def test_range_rate_follows_a_fast_approach_from_the_first_frames() -> None:
    cfg = SafetyConfig()
    rr = RangeRate()
    out = [rr.update(0.1 * i, 50.0 - 1.5 * i, cfg) for i in range(4)]  # 15 m/s onto a stopped car
    assert out[:2] == [None, None] and out[-1] == pytest.approx(15.0)
