"""Ground-truth expert rules on hand-built scenes, occupancy, and the world's scenario families."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import DEFAULT_VEHICLE
from lmm_fusion.base.vocabulary import Action, Light, Risk, Scenario
from lmm_fusion.groundtruth.expert import ExpertInput, Obstacle, assess, comfortable_stop_distance, occupancy
from lmm_fusion.synth.world import World, static_scene


def _stopped_car(gap: float, lateral: float = 0.0) -> Obstacle:
    return Obstacle(gap=gap, lateral=lateral, half_width=0.9, speed=0.0, length=4.5, kind="vehicle")


def test_stopped_car_8m_ahead_depends_on_ego_speed() -> None:
    fast = assess(ExpertInput(ego_speed=15.0, obstacles=[_stopped_car(8.0)]))
    assert fast.risk == Risk.HIGH
    assert fast.action in (Action.STOP, Action.SLOW_DOWN)
    assert fast.ttc == pytest.approx(8.0 / 15.0)
    assert fast.distance == pytest.approx(8.0)
    slow = assess(ExpertInput(ego_speed=1.0, obstacles=[_stopped_car(8.0)]))
    assert slow.risk != Risk.HIGH
    assert slow.ttc == pytest.approx(8.0)


def test_red_light_30m_at_10mps_is_stop() -> None:
    lab = assess(ExpertInput(ego_speed=10.0, light=(30.0, Light.RED)))
    assert lab.action == Action.STOP and lab.light == Light.RED and lab.target_speed == 0.0
    assert math.isinf(lab.ttc) and math.isinf(lab.distance)


def test_light_colour_decides_the_action() -> None:
    assert assess(ExpertInput(ego_speed=10.0, light=(30.0, Light.GREEN))).action == Action.KEEP_LANE
    # yellow: stop only when a comfortable stop still fits (speed from GNSS, distance from LiDAR)
    assert assess(ExpertInput(ego_speed=5.0, light=(30.0, Light.YELLOW))).action == Action.STOP
    assert comfortable_stop_distance(18.0) > 30.0
    assert assess(ExpertInput(ego_speed=18.0, light=(30.0, Light.YELLOW))).action == Action.KEEP_LANE
    # a far red light: slow down first
    assert assess(ExpertInput(ego_speed=5.0, light=(60.0, Light.RED))).action == Action.SLOW_DOWN
    # out of range or behind: no light
    assert assess(ExpertInput(ego_speed=5.0, light=(90.0, Light.RED))).light == Light.NONE
    assert assess(ExpertInput(ego_speed=5.0, light=(-1.0, Light.RED))).light == Light.NONE


def test_stopped_obstacle_lane_change_needs_free_neighbour() -> None:
    obs = _stopped_car(30.0)
    assert assess(ExpertInput(ego_speed=10.0, obstacles=[obs])).action == Action.CHANGE_LANE_LEFT
    # no lane on the left: pass right
    right = assess(ExpertInput(ego_speed=10.0, obstacles=[obs], lanes_left=0))
    assert right.action == Action.CHANGE_LANE_RIGHT and right.free_right and not right.free_left
    # both neighbours blocked next to the obstacle: slow down (far) or stop (near), by ego speed
    blocked = [obs, _stopped_car(32.0, 3.5), _stopped_car(27.0, -3.5)]
    assert assess(ExpertInput(ego_speed=5.0, obstacles=blocked)).action == Action.SLOW_DOWN
    assert assess(ExpertInput(ego_speed=14.0, obstacles=blocked)).action == Action.STOP
    # a car beside the ego in the left lane blocks the change too
    beside = [obs, Obstacle(gap=-4.0, lateral=3.5, half_width=0.9, speed=10.0, length=4.5, kind="vehicle")]
    assert assess(ExpertInput(ego_speed=10.0, obstacles=beside)).action == Action.CHANGE_LANE_RIGHT
    # an obstacle in the neighbouring lane only does not block the ego lane
    lab = assess(ExpertInput(ego_speed=10.0, obstacles=[_stopped_car(10.0, 3.5)]))
    assert lab.action == Action.KEEP_LANE and math.isinf(lab.distance)


def test_moving_lead_follow_or_slow() -> None:
    lead = Obstacle(gap=25.0, lateral=0.0, half_width=0.9, speed=8.0, kind="vehicle")
    follow = assess(ExpertInput(ego_speed=8.5, obstacles=[lead]))
    assert follow.action == Action.FOLLOW and follow.target_speed == pytest.approx(8.0)
    closing = assess(ExpertInput(ego_speed=16.0, obstacles=[lead]))
    assert closing.action in (Action.SLOW_DOWN, Action.STOP) and closing.ttc == pytest.approx(25.0 / 8.0)
    assert closing.risk == Risk.MEDIUM


def test_pedestrian_never_passed() -> None:
    ped = Obstacle(gap=20.0, lateral=0.2, half_width=0.3, speed=0.0, length=0.5, kind="pedestrian")
    lab = assess(ExpertInput(ego_speed=8.0, obstacles=[ped]))
    assert lab.action in (Action.STOP, Action.SLOW_DOWN)
    # on the road but not in the ego corridor, close enough to matter: slow down
    side = Obstacle(gap=15.0, lateral=4.0, half_width=0.3, speed=0.0, length=0.5, kind="pedestrian")
    lab = assess(ExpertInput(ego_speed=8.0, obstacles=[side]))
    assert lab.action == Action.SLOW_DOWN and lab.risk == Risk.MEDIUM


def test_free_road() -> None:
    lab = assess(ExpertInput(ego_speed=12.0))
    assert (lab.risk, lab.action, lab.light) == (Risk.LOW, Action.KEEP_LANE, Light.NONE)
    assert math.isinf(lab.ttc) and math.isinf(lab.distance) and lab.target_speed > 0


def test_static_scene_measures_from_front_bumper() -> None:
    scene = static_scene([{"center": (DEFAULT_VEHICLE.front_offset + 8.0 + 2.25, 0.0, 0.75), "size": (4.5, 1.8, 1.5),
                           "kind": "vehicle"}], ego_speed=15.0)
    lab = scene.label()
    assert lab.distance == pytest.approx(8.0)
    assert lab.risk == Risk.HIGH


def test_occupancy_marks_footprints() -> None:
    occ = occupancy(np.array([[20.0, 0.0], [10.0, 5.0]]), np.array([0.0, 0.0]), np.array([[4.0, 2.0], [0.2, 0.2]]))
    assert occ.shape == OCCUPANCY_GRID.shape and occ.dtype == np.int8
    iy, ix, _ = OCCUPANCY_GRID.indices(np.array([20.0, 10.0, 40.0]), np.array([0.0, 5.0, -10.0]))
    assert occ[iy[0], ix[0]] == 100 and occ[iy[1], ix[1]] == 100  # the thin pole is not missed
    assert occ[iy[2], ix[2]] == 0
    assert set(np.unique(occ)) == {0, 100}
    assert (occ == 100).sum() <= 5 * 3 + 1 + 4  # the car covers at most 5 x 3 one-metre cells


def test_world_cycles_families_and_stays_continuous() -> None:
    fams = [Scenario.TRAFFIC_LIGHT, Scenario.CUT_IN]
    w = World(np.random.default_rng(5), fams)
    seen, last_pose, max_jump = [], None, 0.0
    for k in range(1, 301):  # 30 s
        w.advance(k * 0.1)
        sc = w.scene()
        if not seen or seen[-1] != sc.scenario:
            seen.append(sc.scenario)
        if last_pose is not None:
            max_jump = max(max_jump, math.hypot(sc.ego_pose[0] - last_pose[0], sc.ego_pose[1] - last_pose[1]))
        last_pose = sc.ego_pose
        assert 0.0 <= sc.ego_speed <= 25.0
    assert seen[:4] == [fams[0], fams[1], fams[0], fams[1]]
    assert max_jump < 25.0 * 0.1 + 1e-6  # the ego's map pose never teleports at resets


def test_ego_speed_not_determined_by_scene() -> None:
    """Same family, many episodes: ego speeds at episode start spread over the range."""
    w = World(np.random.default_rng(11), [Scenario.FREE_ROAD])
    speeds = []
    for k in range(1, 200):
        w.advance(k * 1.0)
        speeds.append(w.scene().ego_speed)
    assert np.std(speeds) > 3.0 and max(speeds) - min(speeds) > 10.0


def test_ego_never_drives_through_objects() -> None:
    car = DEFAULT_VEHICLE
    for seed in range(3):
        w = World(np.random.default_rng(seed))
        for k in range(1, 450):
            w.advance(k * 0.1)
            for o in w.scene().expert_input.obstacles:
                overlap = abs(o.lateral) < o.half_width + car.width / 2 and o.gap + o.length > -car.length
                assert not (overlap and o.gap < -0.05), (seed, k, o)


def test_brake_lamps_of_a_lead_in_following_range_mean_slow_down() -> None:
    # 25 m behind a lead at the ego's speed: no closing, headway 2.5 s -> FOLLOW, unless it brakes
    lead = Obstacle(gap=25.0, lateral=0.0, half_width=0.9, speed=10.0, kind="vehicle")
    assert assess(ExpertInput(ego_speed=10.0, obstacles=[lead])).action == Action.FOLLOW
    braking = assess(ExpertInput(ego_speed=10.0, obstacles=[Obstacle(**{**vars(lead), "lamps": "brake"})]))
    assert braking.action == Action.SLOW_DOWN and braking.risk == Risk.MEDIUM
    assert "braking" in braking.rationale and braking.target_speed == pytest.approx(10.0)
    # beyond the following range (3 s x 10 m/s + 10 m) the lamps change nothing
    far = Obstacle(gap=45.0, lateral=0.0, half_width=0.9, speed=10.0, kind="vehicle", lamps="brake")
    assert assess(ExpertInput(ego_speed=10.0, obstacles=[far])).action == Action.KEEP_LANE


def test_a_neighbour_signalling_into_the_ego_lane_means_slow_down() -> None:
    def label(lateral: float, lamps: str, kind: str = "vehicle", gap: float = 12.0):
        o = Obstacle(gap=gap, lateral=lateral, half_width=0.9, speed=6.0, kind=kind, lamps=lamps)
        return assess(ExpertInput(ego_speed=10.0, obstacles=[o]))

    for lateral, towards in ((-3.5, "left"), (3.5, "right")):
        lab = label(lateral, towards)
        assert lab.action == Action.SLOW_DOWN and lab.risk == Risk.MEDIUM, (lateral, towards)
        assert lab.target_speed == pytest.approx(6.0) and "signalling" in lab.rationale
    assert label(-3.5, "right").action == Action.KEEP_LANE  # signalling away from the ego lane
    assert label(-3.5, "").action == Action.KEEP_LANE  # no lamp cue: the same scene is free road
    assert label(-3.5, "left", gap=-8.0).action == Action.KEEP_LANE  # behind the ego front
    assert label(-3.5, "left", gap=45.0).action == Action.KEEP_LANE  # beyond the following range


def test_lamp_cues_change_labels_not_scenes() -> None:
    """With lamp cues the cutting-in car signals towards the ego lane SIGNAL_LEAD s before it steers;
    the world draws no extra random numbers, so the scenes are the same without them."""
    from lmm_fusion.synth.world import SIGNAL_LEAD

    worlds = [World(np.random.default_rng(7), [Scenario.CUT_IN], lamp_cues=cues) for cues in (False, True)]
    cutter = next(a for a in worlds[1].episode.actors if math.isfinite(a.cut_at))
    side = "left" if cutter.d_to > cutter.d_from else "right"
    changed = 0
    for k in range(1, 61):  # 6 s, inside the first episode
        for w in worlds:
            w.advance(k * 0.1)
        plain, cued = worlds[0].scene(), worlds[1].scene()
        assert np.array_equal(plain.boxes.center, cued.boxes.center)
        i = worlds[1].episode.actors.index(cutter)
        t_rel = k * 0.1 - worlds[1].episode.t_start
        signalling = cutter.cut_at - SIGNAL_LEAD <= t_rel < cutter.cut_at + cutter.cut_duration
        assert cued.boxes.signal[i] == (side if signalling else "tail")
        assert plain.boxes.signal[i] == "tail"
        assert all(o.lamps == "" for o in plain.expert_input.obstacles)
        changed += plain.label().action != cued.label().action
        if signalling and cutter.d == cutter.d_from:  # signalling, not yet steering: only the camera knows
            assert cued.label().action in (Action.SLOW_DOWN, Action.STOP, Action.FOLLOW)
    assert changed > 0
