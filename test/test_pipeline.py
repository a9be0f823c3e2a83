"""FusionPipeline on synchronised snapshots (ROS-free; a small random model in a temp dir)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.assessment import MASKED_CONFIDENCE_FACTOR, Assessment, decide_risk
from lmm_fusion.cycle.pipeline import FusionPipeline, resolve_model_dir
from lmm_fusion.cycle.safety import SafetyConfig
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.io.gnss import EgoState


def wall_at(x_base: float, rig: SensorRig, n: int = 200) -> np.ndarray:
    """(n, 4) LiDAR-frame points of a 1 m-wide wall ``x_base`` m ahead of base_link, 0.5..1.5 m high."""
    rng = np.random.default_rng(0)
    base = np.stack([np.full(n, x_base), rng.uniform(-0.5, 0.5, n), rng.uniform(0.5, 1.5, n)], 1)
    m = rig.lidar_mount.matrix()
    lidar = (base - m[:3, 3]) @ m[:3, :3]  # inverse of R x + t
    return np.concatenate([lidar, np.ones((n, 1))], 1).astype(np.float32)


def test_no_sensor_gives_invalid_assessment(pipeline: FusionPipeline) -> None:
    a = pipeline.cycle(SensorSync().snapshot(10.0))
    assert not a.valid and a.rationale.startswith("no assessment")
    assert a.latency_ms["total"] >= 0.0


def test_full_cycle_with_lidar_and_camera(pipeline: FusionPipeline) -> None:
    rig = pipeline.rig
    sync = SensorSync()
    sync.update("camera", 10.0, np.zeros((90, 160, 3), np.uint8))
    sync.update("lidar", 10.0, wall_at(DEFAULT_VEHICLE.front_offset + 12.0, rig))
    a = pipeline.cycle(sync.snapshot(10.05))
    assert a.valid and a.degraded and a.masked_names() == ["gnss"]
    assert a.lidar_free_distance == pytest.approx(12.0, abs=0.01)
    assert a.distance <= 12.0 + 1e-6  # the guard uses the nearer of model and LiDAR
    cap = math.sqrt(2 * pipeline.safety_cfg.decel * (12.0 - pipeline.safety_cfg.margin))
    assert a.target_speed <= min(cap * pipeline.safety_cfg.degraded_factor, pipeline.safety_cfg.no_lidar_speed) + 1e-6
    assert a.occupancy is not None and a.occupancy.shape == pipeline.model_cfg.occupancy_bev_grid.shape
    assert a.modalities[2].attention == 0.0
    assert sum(m.attention for m in a.modalities) == pytest.approx(1.0, abs=1e-5)
    for stage in ("preprocess", "inference", "decode", "safety", "total"):
        assert a.latency_ms[stage] >= 0.0
    assert a.latency_ms["total"] >= a.latency_ms["inference"]


def test_gnss_without_a_motion_estimate_is_reported_masked(pipeline: FusionPipeline) -> None:
    """A drive's first fixes give a GNSS state that is not yet valid: the model runs without GNSS, and
    the assessment must say so (degraded, cautious risk rule, reduced confidence), not claim GNSS."""
    def cycle(valid: bool) -> Assessment:
        sync = SensorSync()
        sync.update("camera", 10.0, np.zeros((90, 160, 3), np.uint8))
        sync.update("lidar", 10.0, wall_at(DEFAULT_VEHICLE.front_offset + 20.0, pipeline.rig))
        sync.update("gnss", 10.0, EgoState(stamp=10.0, east=0.0, north=0.0, up=0.0, speed=8.0 if valid else 0.0,
                                           accel=0.0, heading=0.0, yaw_rate=0.0, status=0, horizontal_std=0.05,
                                           valid=valid))
        pipeline.preprocessor.reset()
        return pipeline.cycle(sync.snapshot(10.05))

    warm, cold = cycle(True), cycle(False)
    assert warm.valid and not warm.degraded and warm.masked_names() == []
    assert cold.valid and cold.degraded and cold.masked_names() == ["gnss"]
    assert cold.modalities[2].age == pytest.approx(0.05)  # the fix arrived; the estimate did not
    assert cold.modalities[2].attention == 0.0
    assert cold.risk == decide_risk(cold.risk_probs, np.array([True, True, False]))
    assert cold.ego_speed is None
    assert cold.confidence == pytest.approx(float(cold.action_probs[cold.model_action]) * MASKED_CONFIDENCE_FACTOR,
                                            rel=1e-5)


def test_stale_lidar_is_masked(pipeline: FusionPipeline) -> None:
    sync = SensorSync()
    sync.update("lidar", 10.0, wall_at(20.0, pipeline.rig))
    sync.update("camera", 10.9, np.zeros((90, 160, 3), np.uint8))
    a = pipeline.cycle(sync.snapshot(11.0))  # LiDAR 1.0 s old > 0.5 s timeout
    assert a.valid and [m.used for m in a.modalities] == [True, False, False]
    assert math.isinf(a.lidar_free_distance)
    assert a.modalities[1].age == pytest.approx(1.0)
    assert "lidar+gnss masked" in a.rationale


def test_close_wall_forces_stop(model_dir: Path) -> None:
    p = FusionPipeline(model_dir, backend="torch", safety_cfg=SafetyConfig(margin=3.0), threads=1)
    sync = SensorSync()
    sync.update("lidar", 5.0, wall_at(DEFAULT_VEHICLE.front_offset + 2.0, p.rig))
    a = p.cycle(sync.snapshot(5.02))
    assert a.action.name == "STOP" and a.target_speed == 0.0
    assert a.rationale.startswith("stop: obstacle 2.0 m ahead")


def test_cloud_is_placed_by_its_own_frame_id(pipeline: FusionPipeline) -> None:
    """A cloud already in base_link is used as is; one in a frame without a transform masks the LiDAR
    with the reason, never placed with a guessed mount."""
    wall = wall_at(DEFAULT_VEHICLE.front_offset + 12.0, pipeline.rig)
    in_base = np.concatenate([pipeline.lidar_in_base(wall), wall[:, 3:]], 1)

    def cycle(points: np.ndarray, frame_id: str) -> Assessment:
        sync = SensorSync()
        sync.update("camera", 10.0, np.zeros((90, 160, 3), np.uint8))
        sync.update("lidar", 10.0, points, frame_id=frame_id)
        pipeline.preprocessor.reset()
        return pipeline.cycle(sync.snapshot(10.05))

    a = cycle(in_base, "base_link")
    assert a.modalities[1].used and a.lidar_free_distance == pytest.approx(12.0, abs=0.01)
    assert pipeline.lidar_reason == ""
    b = cycle(wall, "os_lidar")
    assert [m.used for m in b.modalities] == [True, False, False] and math.isinf(b.lidar_free_distance)
    assert pipeline.lidar_reason == "lidar: no transform from 'os_lidar' to base_link"
    assert pipeline.frame_errors[pipeline.lidar_reason] >= 1
    assert cycle(wall, "lidar").lidar_free_distance == pytest.approx(12.0, abs=0.01)  # the rig's own frame
    assert pipeline.lidar_reason == ""


def test_explicit_missing_model_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_dir"):
        resolve_model_dir(tmp_path / "nope")


def test_modalities_order() -> None:
    assert MODALITIES == ("camera", "lidar", "gnss")
