"""Vehicle geometry (length, width, bumper offset from base_link) as parameters: guard, markers, expert,
node parameters and the synthetic world all measure from the configured bumper."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig, VehicleGeometry
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.safety import SafetyConfig, lane_free_distance
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.groundtruth.expert import ExpertInput, Obstacle, assess, in_ego_corridor
from lmm_fusion.io.msgtypes import rosbags_types
from lmm_fusion.ros import outputs as ro
from lmm_fusion.ros.params import PARAM_BY_NAME, defaults, node_rig, validate, vehicle_geometry
from lmm_fusion.synth.world import World, static_scene

#: A van: 1.2 m more bonnet ahead of the rear axle, 1.5 m longer and wider than the default car.
VAN = VehicleGeometry(length=6.1, width=2.3, front_offset=4.9)
SHIFT = VAN.front_offset - DEFAULT_VEHICLE.front_offset


def wall(x_base: float, rig: SensorRig, n: int = 200) -> np.ndarray:
    """(n, 4) LiDAR-frame points of a wall ``x_base`` m ahead of base_link, 0.5..1.5 m high."""
    rng = np.random.default_rng(1)
    base = np.stack([np.full(n, x_base), rng.uniform(-0.5, 0.5, n), rng.uniform(0.5, 1.5, n)], 1)
    m = rig.lidar_mount.matrix()
    lidar = (base - m[:3, 3]) @ m[:3, :3]
    return np.concatenate([lidar, np.ones((n, 1))], 1).astype(np.float32)


def test_geometry_validates_naming_the_field() -> None:
    DEFAULT_VEHICLE.validate()
    assert VAN.rear_offset == pytest.approx(-1.2)
    for bad, field in ((VehicleGeometry(length=0.0), "vehicle.length"), (VehicleGeometry(width=float("nan")),
                                                                          "vehicle.width"),
                       (VehicleGeometry(length=3.0, front_offset=3.5), "vehicle.front_offset")):
        with pytest.raises(ValueError, match=re.escape(field)):
            bad.validate()


def test_lane_free_distance_moves_by_exactly_the_offset_difference() -> None:
    pts = np.array([[15.0, 0.2, 1.0], [22.0, -0.4, 1.2], [8.0, 3.0, 1.0]], np.float32)
    car = lane_free_distance(pts, SafetyConfig())
    van = lane_free_distance(pts, SafetyConfig(), VAN)
    assert car == pytest.approx(15.0 - DEFAULT_VEHICLE.front_offset, abs=1e-6)
    assert car - van == pytest.approx(SHIFT, abs=1e-6)


def test_pipeline_guard_uses_the_rig_vehicle(pipeline: FusionPipeline) -> None:
    """Same cloud, two vehicles: the guard's free distance (and the distance it acts on) differ by exactly the
    bumper shift, and the longer bonnet gets a lower speed cap."""
    rig0 = pipeline.rig
    out = {}
    try:
        for name, vehicle in (("car", DEFAULT_VEHICLE), ("van", VAN)):
            pipeline.rig = replace(rig0, vehicle=vehicle)
            pipeline.preprocessor.reset()
            sync = SensorSync()
            sync.update("lidar", 10.0, wall(16.0, rig0))
            out[name] = pipeline.cycle(sync.snapshot(10.05))
    finally:
        pipeline.rig = rig0
    car, van = out["car"], out["van"]
    assert car.lidar_free_distance == pytest.approx(16.0 - DEFAULT_VEHICLE.front_offset, abs=1e-3)
    assert car.lidar_free_distance - van.lidar_free_distance == pytest.approx(SHIFT, abs=1e-4)
    assert van.distance <= van.lidar_free_distance + 1e-6
    assert van.target_speed <= car.target_speed + 1e-6


def test_pipeline_refuses_an_impossible_vehicle(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"vehicle\.front_offset"):
        FusionPipeline(model_dir, backend="torch", rig=replace(SensorRig(), vehicle=VehicleGeometry(
            length=2.0, front_offset=3.0)), threads=1)


def _marker(m: Any, ns: str) -> Any:
    return next(mk for mk in m.markers if mk.ns == ns)


def test_markers_move_with_the_bumper(pipeline: FusionPipeline) -> None:
    sync = SensorSync()
    sync.update("lidar", 10.0, wall(16.0, pipeline.rig))
    a = pipeline.cycle(sync.snapshot(10.05))
    assert np.isfinite(a.distance)
    types = rosbags_types()
    car, van = ro.markers(types, a), ro.markers(types, a, vehicle=VAN)
    for ns in ("nearest_obstacle",):
        assert _marker(van, ns).pose.position.x - _marker(car, ns).pose.position.x == pytest.approx(SHIFT)
    assert _marker(van, "path").points[0].x - _marker(car, "path").points[0].x == pytest.approx(SHIFT)
    ego_car, ego_van = _marker(car, "ego"), _marker(van, "ego")
    assert (ego_van.scale.x, ego_van.scale.y) == pytest.approx((VAN.length, VAN.width))
    # The footprint's box spans rear bumper .. front bumper.
    assert ego_van.pose.position.x + ego_van.scale.x / 2 == pytest.approx(VAN.front_offset)
    assert ego_car.pose.position.x + ego_car.scale.x / 2 == pytest.approx(DEFAULT_VEHICLE.front_offset)


def test_node_parameters_are_read_only_and_validated() -> None:
    for name in ("vehicle.length", "vehicle.width", "vehicle.front_offset"):
        assert not PARAM_BY_NAME[name].live
    v = defaults()
    assert vehicle_geometry(v) == DEFAULT_VEHICLE
    v.update({"vehicle.length": 6.1, "vehicle.width": 2.3, "vehicle.front_offset": 4.9})
    assert validate(v) == [] and vehicle_geometry(v) == VAN
    v["vehicle.front_offset"] = 7.0
    (problem,) = validate(v)
    assert "vehicle.front_offset=7.0" in problem and "vehicle.length" in problem
    v["vehicle.front_offset"] = 31.0
    assert validate(v) == ["vehicle.front_offset=31.0: must be in [0, 30]"]


def test_node_rig_takes_geometry_and_intensity_scale() -> None:
    v = defaults()
    assert node_rig(v) == SensorRig()  # 0 = the unit is detected from the clouds
    v.update({"vehicle.length": 6.1, "vehicle.width": 2.3, "vehicle.front_offset": 4.9,
              "lidar.intensity_scale": 255.0})
    rig = node_rig(v)
    assert rig.vehicle == VAN and rig.lidar.intensity_scale == 255.0
    assert not PARAM_BY_NAME["lidar.intensity_scale"].live


def test_expert_measures_corridor_and_lanes_with_the_vehicle() -> None:
    # 1.7 m off centre, 0.4 m half width: beside the car's corridor (0.4 + 0.95 + 0.3 = 1.65 m), in the van's (1.85 m).
    o = Obstacle(gap=10.0, lateral=1.7, half_width=0.4)
    assert not in_ego_corridor(o) and in_ego_corridor(o, VAN)
    assert assess(ExpertInput(ego_speed=8.0, obstacles=[o])).distance == float("inf")
    assert assess(ExpertInput(ego_speed=8.0, obstacles=[o], vehicle=VAN)).distance == pytest.approx(10.0)


def test_synthetic_world_gaps_are_from_the_configured_bumper() -> None:
    box = [{"center": (20.0, 0.0, 0.75), "size": (4.0, 1.8, 1.5)}]
    car = static_scene(box).expert_input.obstacles[0]
    van = static_scene(box, vehicle=VAN).expert_input.obstacles[0]
    assert car.gap - van.gap == pytest.approx(SHIFT)
    # The moving world: every obstacle's gap is its near face along the road minus the van's bumper offset.
    w = World(np.random.default_rng(3), vehicle=VAN)
    w.advance(0.5)
    near = sorted(a.s - a.half_extents_sd()[0] - w.s for a in w.episode.actors
                  if a.kind != "building" and a.z0 <= 2.0)
    gaps = sorted(o.gap + VAN.front_offset for o in w.scene().expert_input.obstacles)
    assert gaps
    np.testing.assert_allclose(gaps, near, atol=1e-9)
