"""Safety guard rules and assessment decoding (no ROS)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base.rig import EGO_FRONT_OFFSET
from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import (
    DEGRADED_RISK_TAIL,
    MASKED_CONFIDENCE_FACTOR,
    Assessment,
    decide_risk,
    decode,
    invalid,
)
from lmm_fusion.cycle.safety import SafetyConfig, apply_guard, lane_free_distance, stopping_speed_cap

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
    ground = points_at(EGO_FRONT_OFFSET + 5.0, 0.0, 0.05)
    overhead = points_at(EGO_FRONT_OFFSET + 6.0, 0.0, 4.0)
    side = points_at(EGO_FRONT_OFFSET + 7.0, 3.0, 1.0)
    behind = points_at(EGO_FRONT_OFFSET - 1.0, 0.0, 1.0)
    obstacle = points_at(EGO_FRONT_OFFSET + 12.5, 0.5, 1.0)
    pts = np.concatenate([ground, overhead, side, behind, obstacle])
    assert lane_free_distance(pts, cfg) == pytest.approx(12.5, abs=1e-4)
    assert math.isinf(lane_free_distance(np.concatenate([ground, overhead, side, behind]), cfg))
    assert math.isinf(lane_free_distance(np.zeros((0, 4), np.float32), cfg))
    far = points_at(EGO_FRONT_OFFSET + cfg.max_range + 1.0)
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
