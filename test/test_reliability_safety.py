"""Masking a modality never makes the guarded suggestion less cautious than with all sensors.

"Less cautious" is a higher target speed or an action lower in :data:`CAUTION` (STOP > SLOW_DOWN >
FOLLOW > KEEP_LANE / lane changes). Two levels, each with the same inputs:

* the guard: the same decoded model output and the same measurements (LiDAR free distance, ego speed),
  once with every modality present and once with each subset masked (hypothesis);
* the pipeline: the same sensor frames through :meth:`FusionPipeline.cycle` with a backend that returns
  one fixed model output (so only the pipeline's own handling of the mask differs), on scenes where the
  masked sensor did not itself measure the hazard: a masked LiDAR cannot report its obstacle, a masked
  GNSS cannot give the ego speed for the TTC rule (see docs/reliability.md).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.base.vocabulary import MODALITIES, Action
from lmm_fusion.cycle.assessment import decode
from lmm_fusion.cycle.safety import SafetyConfig, apply_guard, lane_evidence
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.io.gnss import EgoState

CAUTION = {Action.KEEP_LANE: 0, Action.CHANGE_LANE_LEFT: 0, Action.CHANGE_LANE_RIGHT: 0, Action.FOLLOW: 1,
           Action.SLOW_DOWN: 2, Action.STOP: 3}
MASKS = [np.array(m) for m in itertools.product([True, False], repeat=3) if any(m) and not all(m)]
FULL = np.ones(3, bool)
TTC_MAX, DIST_MAX = 10.0, 50.0


def outputs(action_logits: list[float], speed: float, ttc: float, dist: float) -> dict[str, np.ndarray]:
    """Batch-1 raw model outputs (``lmm_fusion.model.OUTPUT_NAMES``)."""
    ny, nx = OCCUPANCY_GRID.shape
    return {"risk_logits": np.zeros((1, 3), np.float32), "action_logits": np.array([action_logits], np.float32),
            "light_logits": np.zeros((1, 4), np.float32), "target_speed": np.array([speed], np.float32),
            "ttc": np.array([ttc], np.float32), "obstacle_distance": np.array([dist], np.float32),
            "occupancy_logits": np.zeros((1, ny, nx), np.float32),
            "modality_attention": np.full((1, 3), 1 / 3, np.float32)}


def assert_no_less_cautious(masked: Any, full: Any, context: Any) -> None:
    assert masked.target_speed <= full.target_speed + 1e-6, context
    assert CAUTION[masked.action] >= CAUTION[full.action], context


model_outputs = st.builds(
    outputs, st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.floats(0, 35), st.floats(0, 12), st.floats(0, 60))


def lidar_scene(obstacles: list[tuple[float, float]]) -> np.ndarray:
    """base_link points [m]: ground returns plus a 2 x 1.8 x 1 m box at each ``(x, y)``."""
    ground = np.stack([np.linspace(-20, 60, 200), np.linspace(-8, 8, 200), np.zeros(200)], 1)
    dx, dy = np.tile([0.0, 1.0, 2.0], 4), np.repeat([-0.9, -0.3, 0.3, 0.9], 3)
    boxes = [np.stack([x + dx, y + dy, np.full(12, 1.0)], 1) for x, y in obstacles]
    return np.concatenate([ground, *boxes]).astype(np.float32)


lidar_scenes = st.lists(st.tuples(st.floats(-20, 70), st.sampled_from([0.0, 1.0, 2.6, 3.5, -3.5, 5.0])), max_size=4)


@settings(max_examples=300, deadline=None)
@given(out=model_outputs, free=st.one_of(st.none(), st.just(math.inf), st.floats(0, 80)),
       ego=st.one_of(st.none(), st.floats(0, 35)), mask_i=st.integers(0, len(MASKS) - 1),
       scene=st.one_of(st.none(), lidar_scenes), closing=st.one_of(st.none(), st.floats(-5, 35)))
def test_guard_masked_is_no_less_cautious(out: dict[str, np.ndarray], free: float | None, ego: float | None,
                                          mask_i: int, scene: list[tuple[float, float]] | None,
                                          closing: float | None) -> None:
    """The same measurements (free distance or the lane evidence of one scene, closing speed, ego speed)
    with every modality and with a subset masked."""
    cfg = SafetyConfig()
    ages = dict.fromkeys(MODALITIES, 0.05)
    lanes = None if scene is None else lane_evidence(lidar_scene(scene), cfg)
    if lanes is not None:
        free = lanes.free_distance
    full = apply_guard(decode(out, 1.0, FULL, ages, TTC_MAX, DIST_MAX), free, ego, cfg, lanes, closing=closing)
    masked = apply_guard(decode(out, 1.0, MASKS[mask_i], ages, TTC_MAX, DIST_MAX), free, ego, cfg, lanes,
                         closing=closing)
    assert_no_less_cautious(masked, full, (MASKS[mask_i], masked.rationale, full.rationale))


class FixedBackend:
    """A backend whose model output does not depend on its inputs."""

    name, device, precision = "fixed", "cpu", "fp32"

    def __init__(self, out: dict[str, np.ndarray]) -> None:
        self.out = out
        self.inputs: list[dict[str, np.ndarray]] = []

    def describe(self) -> str:
        return "fixed"

    def warmup(self, inputs: dict[str, np.ndarray], iterations: int = 1) -> float:
        return 0.0

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.inputs.append(inputs)
        return self.out


def scene(rng: np.random.Generator, lidar_obstacle: float | None, ego_speed: float) -> dict[str, Any]:
    """Frames: a camera image, a LiDAR cloud (ground returns, plus an obstacle ``lidar_obstacle`` m ahead of
    the sensor when given) and a valid GNSS ego state at ``ego_speed`` [m/s]."""
    z_ground = -SensorRig().lidar_mount.z  # the road surface in the LiDAR frame
    ground = np.stack([rng.uniform(0, 60, 3000), rng.uniform(-15, 15, 3000), z_ground + rng.uniform(-0.05, 0.05, 3000),
                       rng.uniform(0, 1, 3000)], 1)
    pts = [ground]
    if lidar_obstacle is not None:
        pts.append(np.stack([np.full(200, lidar_obstacle), rng.uniform(-1, 1, 200),
                             z_ground + rng.uniform(0.5, 1.5, 200), np.ones(200)], 1))
    return {"camera": rng.integers(0, 255, (96, 128, 3), dtype=np.uint8),
            "lidar": np.concatenate(pts).astype(np.float32),
            "gnss": EgoState(10.0, 0.0, 0.0, 0.0, ego_speed, 0.0, 0.0, 0.0, 0, 0.5, True)}


def run(pipeline: Any, frames: dict[str, Any], mask: np.ndarray) -> Any:
    fr = {s: frames[s] if m else None for s, m in zip(MODALITIES, mask)}
    ages = {s: 0.05 if m else math.inf for s, m in zip(MODALITIES, mask)}
    return pipeline.cycle(Snapshot(10.0, fr, ages, mask.copy(), dict.fromkeys(MODALITIES, 9.95)))


# (model action, model speed [m/s], model TTC [s], model distance [m], LiDAR obstacle [m] | None, ego speed [m/s])
CASES = [
    (Action.KEEP_LANE, 25.0, 10.0, 50.0, None, 10.0),  # free road, fast proposal
    (Action.KEEP_LANE, 8.0, 10.0, 50.0, None, 3.0),  # free road, slow proposal
    (Action.FOLLOW, 14.0, 6.0, 30.0, 40.0, 8.0),  # lead seen by both; the model's distance decides
    (Action.SLOW_DOWN, 6.0, 4.0, 12.0, 25.0, 2.0),  # the model sees a nearer hazard (e.g. a stop line)
    (Action.STOP, 0.0, 1.0, 6.0, None, 12.0),  # the model stops
    (Action.CHANGE_LANE_LEFT, 12.0, 10.0, 50.0, None, 0.0),  # standing still
    (Action.CHANGE_LANE_RIGHT, 9.0, 10.0, 50.0, 30.0, 9.0),  # a free right lane beside an obstacle
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].name}-{c[1]:g}" for c in CASES])
def test_pipeline_masked_is_no_less_cautious(pipeline: Any, case: tuple[Any, ...]) -> None:
    action, speed, ttc, dist, lidar_obstacle, ego_speed = case
    logits = [0.0] * 6
    logits[int(action)] = 4.0
    backend = pipeline.backend
    pipeline.backend = FixedBackend(outputs(logits, speed, ttc, dist))
    try:
        frames = scene(np.random.default_rng(int(action)), lidar_obstacle, ego_speed)
        full = run(pipeline, frames, FULL)
        assert full.valid and full.mask.all()
        for mask in MASKS:
            masked = run(pipeline, frames, mask)
            assert masked.valid and (masked.mask == mask).all()
            assert_no_less_cautious(masked, full, (case, mask, masked.rationale, full.rationale))
            if not mask[MODALITIES.index("lidar")]:
                assert masked.target_speed <= pipeline.safety_cfg.no_lidar_speed + 1e-6
            assert masked.degraded and masked.confidence <= full.confidence + 1e-6
    finally:
        pipeline.backend = backend
