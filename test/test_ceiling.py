"""Pieces of the ceiling study: grid and camera cuts, LiDAR hits, the outside-grid lane check, the
speed sensitivity, and that the rebuilt world is frame for frame the recorded one."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import INPUT_GRID
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig
from lmm_fusion.base.vocabulary import Action, Scenario
from lmm_fusion.groundtruth.expert import ExpertInput, Obstacle, assess
from lmm_fusion.io.bags import read_bag
from lmm_fusion.offline.ceiling import (
    FrameTruth,
    add_closing_guard,
    closing_guard,
    grid_rear_blind_zone,
    in_camera_view,
    in_grid,
    outside_grid_blockers,
    points_on_box,
    rebuild_world,
    speed_sensitive,
    stopped_moving_ambiguous,
    two_frame_speeds,
)
from lmm_fusion.synth.drive import START_TIME, rig_from_args, synthesize

FRONT = DEFAULT_VEHICLE.front_offset


def test_rear_blind_zone_of_the_shipped_grid() -> None:
    lo, hi = grid_rear_blind_zone()
    # ego rear at 3.7 - 4.6 = -0.9 m; the lane must be free from 8 m behind it: x = -8.9 m < x_min = -8 m
    assert lo == pytest.approx(DEFAULT_VEHICLE.rear_offset - 8.0) == pytest.approx(-8.9)
    assert hi == INPUT_GRID.x_min == -8.0


def test_in_grid_cuts_footprints_by_any_part() -> None:
    assert not in_grid(np.array([-8.5, 3.5]), 0.0, 0.8, 1.8)  # entirely in x (-8.9, -8.1)
    assert in_grid(np.array([-9.0, 3.5]), 0.0, 4.5, 1.8)  # front part reaches x > -8
    assert not in_grid(np.array([20.0, 17.5]), 0.0, 4.5, 1.8)  # beyond y_max = 16
    assert in_grid(np.array([55.0, 0.0]), 0.0, 4.5, 1.8)  # near face inside, far face beyond x_max
    assert not in_grid(np.array([60.0, 0.0]), 0.0, 4.5, 1.8)


def test_camera_view_is_the_forward_frustum_within_range() -> None:
    rig = SensorRig()
    assert in_camera_view(np.array([[20.0, 0.0, 1.0]]), rig)
    assert not in_camera_view(np.array([[-10.0, 0.0, 1.0]]), rig)  # behind
    assert not in_camera_view(np.array([[10.0, 12.0, 1.0]]), rig)  # 50 deg to the left of a 90 deg HFOV
    assert in_camera_view(np.array([[10.0, 7.0, 1.0]]), rig)
    assert not in_camera_view(np.array([[80.0, 0.0, 1.0]]), rig)  # beyond CAMERA_RANGE
    assert in_camera_view(np.array([[80.0, 0.0, 1.0]]), rig, max_range=100.0)


def test_points_on_box_counts_returns_above_the_ground() -> None:
    centre, size = np.array([10.0, 0.0, 0.75]), np.array([4.0, 2.0, 1.5])
    pts = np.array([[8.1, 0.0, 0.8], [11.9, 0.9, 1.4], [10.0, 0.0, 0.05],  # on, on, ground
                    [13.0, 0.0, 0.8], [10.0, 1.5, 0.8]])  # beyond the 0.2 m margin
    assert points_on_box(pts, centre, 0.0, size) == 2
    # rotated 90 deg the 4 m side runs along y: only (10, 1.5) is then on it
    assert points_on_box(pts, centre, np.pi / 2, size) == 1
    assert points_on_box(np.zeros((0, 3)), centre, 0.0, size) == 0


def _frame(inp: ExpertInput) -> FrameTruth:
    """A FrameTruth of a straight road: obstacle boxes from their road terms (base_link = road)."""
    centres, yaws, sizes, grid = [], [], [], []
    for o in inp.obstacles:
        c = np.array([o.gap + FRONT + o.length / 2, o.lateral, 0.75])
        centres.append(c)
        yaws.append(0.0)
        sizes.append([o.length, 2 * o.half_width, 1.5])
        grid.append(in_grid(c[:2], 0.0, o.length, 2 * o.half_width))
    return FrameTruth(t=0.0, episode=0, scenario=Scenario.STOPPED_OBSTACLE_FREE_LEFT, inp=inp, label=assess(inp),
                      centers=np.array(centres), yaws=np.array(yaws), sizes=np.array(sizes), in_grid=grid)


def test_lane_change_hinges_on_a_car_behind_the_grid() -> None:
    stopped = Obstacle(gap=25.0, lateral=0.0, half_width=0.9, speed=0.0, length=4.0, kind="obstacle")
    # a car in the left lane whose front is at x = -8.5 m: inside the expert's check, outside the grid
    behind = Obstacle(gap=-8.5 - FRONT - 4.5, lateral=3.5, half_width=0.9, speed=8.0, length=4.5, kind="vehicle")
    inp = ExpertInput(ego_speed=8.0, obstacles=(stopped, behind), lanes_left=1, lanes_right=0)
    fr = _frame(inp)
    assert fr.in_grid == [True, False]
    assert fr.label.action != Action.CHANGE_LANE_LEFT  # the expert waits for the car behind
    assert outside_grid_blockers(fr) == [1]
    cut = ExpertInput(ego_speed=8.0, obstacles=(stopped,), lanes_left=1, lanes_right=0)
    assert assess(cut).action == Action.CHANGE_LANE_LEFT  # what the grid shows says: pass
    # the same car 1 m further forward is in the grid: no blind-zone dependence
    seen = Obstacle(gap=-7.5 - FRONT - 4.5, lateral=3.5, half_width=0.9, speed=8.0, length=4.5, kind="vehicle")
    assert outside_grid_blockers(_frame(ExpertInput(ego_speed=8.0, obstacles=(stopped, seen), lanes_left=1,
                                                    lanes_right=0))) == []


def test_speed_sensitivity_and_stopped_moving_flip() -> None:
    free = ExpertInput(ego_speed=10.0)
    assert not speed_sensitive(free, assess(free).action)
    # a lead 30 m ahead closing at 7.4 m/s: TTC 4.05 s, 1 m/s more and it is below 4 s (SLOW_DOWN)
    lead = ExpertInput(ego_speed=10.0, obstacles=(Obstacle(gap=30.0, lateral=0.0, half_width=0.9, speed=2.6,
                                                           kind="vehicle"),))
    assert assess(lead).action == Action.FOLLOW
    assert speed_sensitive(lead, Action.FOLLOW)
    # a stopped car with the left lane free: passing it; taken as moving at the ego speed it is followed
    parked = ExpertInput(ego_speed=10.0, obstacles=(Obstacle(gap=30.0, lateral=0.0, half_width=0.9, speed=0.0,
                                                             kind="vehicle"),), lanes_left=1)
    lab = assess(parked)
    assert lab.action == Action.CHANGE_LANE_LEFT
    assert stopped_moving_ambiguous(parked, lab)
    assert not stopped_moving_ambiguous(free, assess(free))


def test_rebuilt_world_reproduces_the_recorded_labels(tmp_path: Path) -> None:
    rig = rig_from_args(camera=(160, 90), lidar_beams=8, lidar_columns=256)
    bag = synthesize(tmp_path / "d", seconds=1.5, seed=11, scenarios=[Scenario.STOPPED_OBSTACLE_FREE_LEFT], rig=rig,
                     compressed=True, progress=False, start=2.0)
    frames, views = rebuild_world(11, Scenario.STOPPED_OBSTACLE_FREE_LEFT, 1.5, 2.0, True, rig)
    recorded = {round((m.stamp_sec - START_TIME) * 1e6): int(m.msg.action) for m in read_bag(bag, [T.GT_ACTION])}
    assert len(recorded) == 15 and set(recorded) == set(frames)
    assert all(int(frames[k].label.action) == a for k, a in recorded.items())
    assert len(views) >= 2 * len(frames)  # 20 Hz camera over the warm-up and the labelled part


def test_two_frame_speeds_in_cells_without_ego_motion_compensation() -> None:
    def frame(gaps: list[float], t: float) -> FrameTruth:
        obs = tuple(Obstacle(gap=g, lateral=0.0, half_width=0.9, kind="vehicle") for g in gaps)
        return replace(_frame(ExpertInput(ego_speed=10.0, obstacles=obs)), t=t)

    then, now = frame([25.0, 15.0, 30.0], 0.0), frame([20.0, 15.0, 29.6], 0.5)
    seen = [True, True, True]
    # stopped: 5 m (10 cells) back in 0.5 s at 10 m/s; lead at the ego speed: 0 cells; 0.4 m: within a cell
    assert two_frame_speeds(now, (then, seen), seen, 10.0) == [pytest.approx(0.0), pytest.approx(10.0),
                                                                 pytest.approx(9.0)]
    assert two_frame_speeds(now, (then, [False, True, True]), seen, 10.0)[0] is None
    assert two_frame_speeds(now, None, seen, 10.0) == [None, None, None]
    assert two_frame_speeds(now, (replace(then, episode=1), seen), seen, 10.0) == [None, None, None]


def test_closing_speed_guard_lets_the_expert_pass_a_stopped_obstacle() -> None:
    # standing 1.5 m behind a stopped obstacle (closing 0): the shipped guard's stopping-distance cap
    # stops everything; the closing-speed guard lets the lane change through, still stops a keep-lane
    assert closing_guard(Action.CHANGE_LANE_LEFT, 1.5, 0.0) == Action.CHANGE_LANE_LEFT
    assert closing_guard(Action.KEEP_LANE, 1.5, 0.0) == Action.STOP
    # a lead 20 m ahead at 10 m/s closing at 2 m/s: TTC 10 s, headway 2 s: following is fine
    assert closing_guard(Action.FOLLOW, 20.0, 2.0) == Action.FOLLOW
    assert closing_guard(Action.FOLLOW, 20.0, 8.0) == Action.SLOW_DOWN  # TTC 2.5 s
    assert closing_guard(Action.CHANGE_LANE_LEFT, 10.0, 8.0) == Action.STOP  # TTC 1.25 s
    assert closing_guard(Action.KEEP_LANE, math.inf, None) == Action.KEEP_LANE


def test_add_closing_guard_measures_closing_within_each_drive() -> None:
    def row(t: float, d: float | None, drive: int, truth: Action = Action.FOLLOW) -> dict[str, object]:
        return {"t": t, "lidar_free_distance": d, "drive": drive, "truth": int(truth), "model": int(truth),
                "ego_speed_est": 10.0}

    # drive 0: first row without history: d / ego speed = 2 s < 3 s, SLOW_DOWN as shipped; then a lead
    # closing at 8 m/s (20 m -> 16 m in 0.5 s): TTC 2 s, SLOW_DOWN. Drive 1 (same times, its own
    # history): 40 m / 10 m/s = 4 s, then not closing: FOLLOW stands
    rows = [row(0.0, 20.0, 0), row(0.5, 16.0, 0), row(0.0, 40.0, 1), row(0.5, 40.0, 1)]
    add_closing_guard(rows)
    assert [r["closing_guard_on_expert"] for r in rows] == [int(Action.SLOW_DOWN), int(Action.SLOW_DOWN),
                                                           int(Action.FOLLOW), int(Action.FOLLOW)]
    # a lead at the ego speed 12 m ahead: headway 1.2 s, but not closing: FOLLOW stands
    same = [row(0.0, 12.0, 0), row(0.5, 12.0, 0)]
    add_closing_guard(same)
    assert same[1]["closing_guard_on_expert"] == int(Action.FOLLOW)
    # a jump of the free distance (another object cut in) is not a closing speed: d / ego speed
    jump = [row(0.0, 40.0, 0), row(0.5, 8.0, 0)]
    add_closing_guard(jump)
    assert jump[1]["closing_guard_on_expert"] == int(Action.STOP)  # 8 m / 10 m/s = 0.8 s
