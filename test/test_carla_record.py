"""Tick assembly, world snapshot -> ground truth, and the recorder's bag layout (no server)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base import topics
from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig
from lmm_fusion.base.vocabulary import Action, Light, Risk, Scenario
from lmm_fusion.carla.record import (
    Actor,
    CarlaRecorder,
    EgoTruth,
    TickAssembler,
    actor_kind,
    expert_input,
    footprints_in_base,
    ground_truth,
    project_to_path,
)
from lmm_fusion.groundtruth.expert import occupancy

PERIODS = {"camera": 1, "lidar": 2, "gnss": 2}


# ----------------------------------------------------------------------------------- TickAssembler
def test_complete_ticks_by_frame_number() -> None:
    asm = TickAssembler(PERIODS, start_frame=100)
    assert asm.due(100) == ("camera", "lidar", "gnss") and asm.due(101) == ("camera",)
    assert asm.due(99) == ()
    # frames arrive interleaved and out of order across sensors
    assert asm.add("lidar", 100, "L100")
    assert asm.add("camera", 101, "C101")
    assert asm.complete(100) is None  # camera and gnss of 100 still missing
    assert asm.received(100) == ["lidar"] and asm.pending == [100, 101]
    assert asm.add("camera", 100, "C100")
    assert asm.add("gnss", 100, "G100")
    tick = asm.complete(100)
    assert tick is not None and tick.frame == 100 and tick.data == {"lidar": "L100", "camera": "C100", "gnss": "G100"}
    tick = asm.complete(101)
    assert tick is not None and tick.data == {"camera": "C101"}
    assert asm.complete(101) is None  # handed out once
    assert asm.counters.complete == 2 and asm.counters.incomplete == 0


def test_skipped_late_duplicate_unknown() -> None:
    asm = TickAssembler(PERIODS, start_frame=10)
    assert not asm.add("lidar", 11, "x")  # lidar not due on odd frames
    assert not asm.add("camera", 9, "x")  # before the start
    assert not asm.add("radar", 10, "x")
    assert asm.add("camera", 10, "a")
    assert not asm.add("camera", 10, "b")  # duplicate
    asm.add("lidar", 10, "l")
    asm.add("gnss", 10, "g")
    assert asm.complete(10) is not None
    assert not asm.add("camera", 10, "late")
    c = asm.counters
    assert (c.skipped, c.unknown, c.duplicate, c.late, c.complete) == (2, 1, 1, 1, 1)


def test_incomplete_ticks_dropped_and_counted() -> None:
    asm = TickAssembler(PERIODS, start_frame=0)
    asm.add("camera", 0, "c0")
    asm.add("gnss", 0, "g0")  # lidar 0 never arrives
    asm.add("camera", 1, "c1")
    assert asm.complete(1) is not None
    assert asm.pending == [0]
    assert asm.expire(2) == 1  # frame 0 dropped; frame 1 was handed out
    assert asm.pending == []
    assert asm.counters.incomplete == 1 and asm.counters.missing == {"camera": 0, "lidar": 1, "gnss": 0}
    # a tick where a due sensor delivered nothing at all is counted too
    assert asm.expire(4) == 2  # frames 2 and 3: camera due, nothing arrived
    assert asm.counters.incomplete == 3 and asm.counters.missing["camera"] == 2
    assert not asm.add("camera", 3, "late")
    assert asm.counters.late == 1


def test_pending_is_bounded() -> None:
    asm = TickAssembler({"camera": 1, "lidar": 1}, start_frame=0, max_pending=4)
    for f in range(10):
        asm.add("camera", f, f)  # lidar silent
    assert len(asm.pending) == 4 and asm.pending[0] == 6
    assert asm.counters.incomplete == 6 and asm.counters.missing["lidar"] == 6


def test_assembler_rejects_bad_periods() -> None:
    with pytest.raises(ValueError, match="periods"):
        TickAssembler({"camera": 0}, 0)
    with pytest.raises(ValueError, match="periods"):
        TickAssembler({"camera": 1.5}, 0)  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------ ground truth
def straight_ego(speed: float = 10.0, yaw: float = 0.0, **kw: object) -> EgoTruth:
    xs = np.arange(-4.0, 80.0, 2.0)
    path = np.stack([xs, np.zeros_like(xs)], axis=1)
    return EgoTruth(x=100.0, y=50.0, z=0.0, yaw=yaw, vx=speed * math.cos(yaw), vy=speed * math.sin(yaw),
                    lane_path=path, **kw)  # type: ignore[arg-type]


def test_footprints_in_base_rotates_into_ego_frame() -> None:
    ego = straight_ego(yaw=math.pi / 2)  # heading north
    a = Actor(id=1, kind="vehicle", x=100.0, y=70.0, yaw=math.pi / 2, length=4.0, width=2.0)  # 20 m north
    b = Actor(id=2, kind="vehicle", x=95.0, y=50.0, yaw=0.0, length=4.0, width=2.0)  # 5 m west = left
    centres, yaws, sizes = footprints_in_base(ego, [a, b])
    np.testing.assert_allclose(centres, [[20.0, 0.0], [0.0, 5.0]], atol=1e-9)
    np.testing.assert_allclose(yaws, [0.0, -math.pi / 2], atol=1e-12)
    np.testing.assert_allclose(sizes, [[4.0, 2.0], [4.0, 2.0]])


def test_occupancy_rasterisation_of_boxes() -> None:
    ego = straight_ego()
    # box centred 10.5 m ahead, 0.5 m left (a cell centre), 3 x 1 m, aligned with the ego
    actor = Actor(id=1, kind="vehicle", x=110.5, y=50.5, yaw=0.0, length=3.0, width=1.0)
    grid = OCCUPANCY_GRID
    occ = occupancy(*footprints_in_base(ego, [actor]), grid)
    assert occ.shape == grid.shape and set(np.unique(occ).tolist()) == {0, 100}
    iy, ix = np.nonzero(occ == 100)
    xs = grid.x_min + (ix + 0.5) * grid.cell
    ys = grid.y_min + (iy + 0.5) * grid.cell
    # Footprint spans x 9..12, y 0..1 -> cells with centres x in {9.5, 10.5, 11.5}, y 0.5 (inside),
    # plus the border cells its edge samples fall into (x = 12.0 edge -> cell 12.5 etc.)
    assert {(9.5, 0.5), (10.5, 0.5), (11.5, 0.5)} <= set(zip(xs.tolist(), ys.tolist()))
    assert xs.min() >= 8.5 and xs.max() <= 12.5 and ys.min() >= -0.5 and ys.max() <= 1.5
    # rotated 90 deg the same box covers y instead of x
    turned = Actor(id=1, kind="vehicle", x=110.5, y=50.5, yaw=math.pi / 2, length=3.0, width=1.0)
    iy, ix = np.nonzero(occupancy(*footprints_in_base(ego, [turned]), grid) == 100)
    xs = grid.x_min + (ix + 0.5) * grid.cell
    ys = grid.y_min + (iy + 0.5) * grid.cell
    assert ys.max() - ys.min() >= 2.0 and xs.max() - xs.min() <= 2.0
    # nothing outside the grid is drawn, nothing without actors
    assert not occupancy(*footprints_in_base(ego, []), grid).any()
    far = Actor(id=3, kind="vehicle", x=300.0, y=50.0, yaw=0.0, length=4.0, width=2.0)
    assert not occupancy(*footprints_in_base(ego, [far]), grid).any()


def test_project_to_path_on_curve() -> None:
    # quarter circle of radius 20 turning left, starting at the ego
    th = np.linspace(0.0, math.pi / 2, 200)
    path = np.stack([20 * np.sin(th), 20 - 20 * np.cos(th)], axis=1)
    # a point on the arc at 45 deg, 1 m outside (to the right of the driving direction)
    p = np.array([[21 * math.sin(math.pi / 4), 20 - 21 * math.cos(math.pi / 4)]])
    s, d, tangent = project_to_path(p, path)
    assert s[0] == pytest.approx(20 * math.pi / 4, rel=1e-3)
    assert d[0] == pytest.approx(-1.0, abs=1e-3)
    np.testing.assert_allclose(tangent[0], [math.cos(math.pi / 4), math.sin(math.pi / 4)], atol=1e-2)
    # points behind the start of the path project onto its extension
    line = np.array([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]])
    s, d, _ = project_to_path(np.array([[-5.0, 0.5], [14.0, -2.0]]), line)
    np.testing.assert_allclose(s, [-5.0, 14.0], atol=1e-12)
    np.testing.assert_allclose(d, [0.5, -2.0], atol=1e-12)


def test_expert_input_gap_and_speed() -> None:
    ego = straight_ego(speed=15.0)
    lead = Actor(id=1, kind="vehicle", x=140.0, y=50.2, yaw=0.0, length=4.0, width=2.0, vx=5.0)
    inp = expert_input(ego, [lead])
    o = inp.obstacles[0]
    # box centre 40 m ahead of base_link, rear face at 38 m, bumper at DEFAULT_VEHICLE.front_offset
    assert o.gap == pytest.approx(38.0 - DEFAULT_VEHICLE.front_offset)
    assert o.lateral == pytest.approx(0.2) and o.half_width == pytest.approx(1.0) and o.length == pytest.approx(4.0)
    assert o.speed == pytest.approx(5.0) and o.kind == "vehicle"
    assert inp.ego_speed == pytest.approx(15.0)


def test_ground_truth_lead_vehicle_ttc() -> None:
    ego = straight_ego(speed=20.0, lanes_left=0)
    lead = Actor(id=1, kind="vehicle", x=100.0 + DEFAULT_VEHICLE.front_offset + 12.0 + 2.0, y=50.0, yaw=0.0, length=4.0,
                 width=2.0, vx=10.0)  # rear face 12 m ahead of the bumper, closing at 10 m/s
    gt = ground_truth(ego, [lead])
    assert gt.label.distance == pytest.approx(12.0)
    assert gt.label.ttc == pytest.approx(1.2)
    assert gt.label.action == Action.STOP and gt.label.risk == Risk.HIGH
    assert gt.scenario == Scenario.LEAD_VEHICLE
    assert gt.occupancy.dtype == np.int8 and (gt.occupancy == 100).sum() >= 8


def test_ground_truth_free_road_and_red_light() -> None:
    gt = ground_truth(straight_ego(speed=10.0), [])
    assert gt.label.action == Action.KEEP_LANE and gt.scenario == Scenario.FREE_ROAD
    assert math.isinf(gt.label.ttc) and not gt.occupancy.any()
    gt = ground_truth(straight_ego(speed=10.0, light=(12.0, Light.RED)), [])
    assert gt.label.action == Action.STOP and gt.label.light == Light.RED
    assert gt.scenario == Scenario.TRAFFIC_LIGHT


def test_ground_truth_stopped_obstacle_with_free_left_lane() -> None:
    ego = straight_ego(speed=10.0, lanes_left=1)
    obstacle = Actor(id=1, kind="vehicle", x=145.0, y=50.0, yaw=0.0, length=4.0, width=2.0)
    gt = ground_truth(ego, [obstacle])
    assert gt.label.action == Action.CHANGE_LANE_LEFT
    assert gt.scenario == Scenario.STOPPED_OBSTACLE_FREE_LEFT
    blocker = Actor(id=2, kind="vehicle", x=145.0, y=53.5, yaw=0.0, length=4.0, width=2.0)
    gt = ground_truth(ego, [obstacle, blocker])
    assert gt.label.action != Action.CHANGE_LANE_LEFT
    assert gt.scenario == Scenario.STOPPED_OBSTACLE_BLOCKED


def test_actor_kind() -> None:
    assert actor_kind("vehicle.tesla.model3") == "vehicle"
    assert actor_kind("walker.pedestrian.0001") == "pedestrian"
    assert actor_kind("static.prop.trafficcone01") == "obstacle"


# ------------------------------------------------------------------------------------------ recorder
def test_recorder_writes_synthetic_layout(tmp_path: Path) -> None:
    from lmm_fusion.io import create_cloud, make_header, rosbags_types
    from lmm_fusion.io.bags import bag_counts, bag_topics, read_bag

    rig = SensorRig()
    types = rosbags_types()
    ego = straight_ego(speed=20.0)
    lead = Actor(id=1, kind="vehicle", x=120.0, y=50.0, yaw=0.0, length=4.0, width=2.0, vx=10.0)
    path = tmp_path / "drive"
    with CarlaRecorder(path, rig) as rec:
        rec.write_static(0.0)
        rec.write_static(0.0)  # once only
        for k in range(3):
            stamp = 1.0 + 0.1 * k
            pts = np.array([[10.0, 0.0, 0.0, 1.0]], np.float32)
            rec.write_message(topics.LIDAR_POINTS, stamp,
                              create_cloud(types, make_header(types, stamp, topics.LIDAR_FRAME), pts,
                                           ("x", "y", "z", "intensity")))
            rec.write_truth(stamp, ground_truth(ego, [lead]), ego, [lead])
    t = bag_topics(path)
    assert t[topics.GT_SCENE] == "lmm_fusion/msg/SceneAssessment"
    assert t[topics.GT_ACTION] == "lmm_fusion/msg/ActionSuggestion"
    assert t[topics.GT_OCCUPANCY] == "nav_msgs/msg/OccupancyGrid"
    assert t[topics.GT_SCENARIO] == "std_msgs/msg/String"
    assert t[topics.GT_EGO] == "nav_msgs/msg/Odometry"
    assert t[topics.TF_STATIC] == "tf2_msgs/msg/TFMessage"
    counts = bag_counts(path)
    assert counts[topics.TF_STATIC] == 1 and counts[topics.GT_SCENE] == 3 and counts[topics.LIDAR_POINTS] == 3
    msgs = {m.topic: m.msg for m in read_bag(path, [topics.GT_SCENE, topics.GT_OCCUPANCY, topics.GT_SCENARIO,
                                                     topics.GT_EGO, topics.GT_ACTION])}
    scene = msgs[topics.GT_SCENE]
    assert scene.valid and scene.risk_level == Risk.HIGH
    assert scene.header.stamp.sec == 1 and abs(scene.header.stamp.nanosec - 200_000_000) < 2
    assert scene.nearest_obstacle_distance == pytest.approx(20.0 - 2.0 - DEFAULT_VEHICLE.front_offset, rel=1e-5)
    grid = msgs[topics.GT_OCCUPANCY]
    assert grid.info.width == OCCUPANCY_GRID.nx and set(np.unique(grid.data).tolist()) == {0, 100}
    assert msgs[topics.GT_SCENARIO].data == "LEAD_VEHICLE"
    odo = msgs[topics.GT_EGO]
    assert odo.pose.pose.position.x == pytest.approx(100.0) and odo.twist.twist.linear.x == pytest.approx(20.0)
    assert msgs[topics.GT_ACTION].action == int(Action.STOP)
