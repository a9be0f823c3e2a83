"""The ego's route at a junction, on real ``carla.Waypoint`` objects of an OpenDRIVE map read by the
client (``carla.Map(name, xodr)``; no server): one branch for ground truth, pure pursuit and the
Traffic Manager, the Traffic Manager's own choice followed, and a lane change keeping the exit."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from carla_xodr import JUNCTION, LANE_WIDTH, ROAD_LEFT, ROAD_STRAIGHT, fork_xodr

from lmm_fusion.carla.route import Route, exit_of

pytestmark = pytest.mark.skipif(importlib.util.find_spec("carla") is None,
                                reason="carla client (carla==0.9.16) not installed")


@pytest.fixture(scope="module")
def carla() -> Any:
    import carla

    return carla


@pytest.fixture(scope="module")
def fork(carla: Any) -> Any:
    return carla.Map("fork", fork_xodr(lanes=2))


def lane_y(lane_id: int) -> float:
    """CARLA y of a lane centre on the incoming road (lane -1 next to the reference line)."""
    return (-lane_id - 0.5) * LANE_WIDTH


def drive_to(route: Route, m: Any, carla: Any, x: float, lane_id: int = -1) -> bool:
    loc = carla.Location(x=x, y=lane_y(lane_id), z=0.0)
    return route.update(loc.x, loc.y, 0.0, lambda: m.get_waypoint(loc))


def exit_road(route: Route) -> int:
    exit_ = route.planned_exit(JUNCTION)
    assert exit_ is not None
    return exit_[0]


def seed_for(m: Any, carla: Any, road: int) -> int:
    """A seed whose route leaves the junction by ``road``."""
    for seed in range(50):
        r = Route(seed=seed)
        drive_to(r, m, carla, 10.0)
        if exit_road(r) == road:
            return seed
    raise AssertionError(f"no seed in 0..49 takes road {road}")


def test_first_successor_is_not_a_choice(fork: Any, carla: Any) -> None:
    # next()[0] is whichever successor the API lists first, not a choice: both exits are listed.
    wp = fork.get_waypoint(carla.Location(x=49.0, y=lane_y(-1)))
    branches = wp.next(2.0)
    assert len(branches) == 2 and all(b.is_junction for b in branches)
    assert {exit_of(b)[0] for b in branches} == {ROAD_STRAIGHT, ROAD_LEFT}


@pytest.mark.parametrize("road", [ROAD_STRAIGHT, ROAD_LEFT])
def test_route_takes_one_branch_for_everyone(fork: Any, carla: Any, road: int) -> None:
    seed = seed_for(fork, carla, road)
    route = Route(seed=seed)
    assert drive_to(route, fork, carla, 10.0)  # a choice ahead was made
    # the same seed makes the same choice (repeatable runs)
    again = Route(seed=seed)
    drive_to(again, fork, carla, 10.0)
    assert exit_road(again) == road
    # the plan (ground truth's and pure pursuit's lane) runs onto the chosen road
    roads = [n.wp.road_id for n in route.nodes]
    assert roads[0] == 1 and road in roads and ({ROAD_STRAIGHT, ROAD_LEFT} - {road}).isdisjoint(roads)
    assert len(route.nodes) == 101 and route.nodes[1].x - route.nodes[0].x == pytest.approx(2.0, abs=1e-3)
    # the Traffic Manager's path: a point on the chosen exit road (the road CARLA's TM matches at the
    # branch), then the plan's end, all on the chosen road
    path = route.tm_path()
    assert len(path) == 2
    on = [fork.get_waypoint(carla.Location(x=x, y=y, z=z)) for x, y, z in path]
    assert [w.road_id for w in on] == [road, road] and not on[0].is_junction
    # driving on keeps the choice and only trims the plan
    revision = route.revision
    assert not drive_to(route, fork, carla, 30.0)
    assert route.revision == revision and exit_road(route) == road and route.replans == 0
    assert route.nodes[0].x == pytest.approx(30.0, abs=2.0)


def test_lane_change_keeps_the_junction_exit(fork: Any, carla: Any) -> None:
    for road in (ROAD_STRAIGHT, ROAD_LEFT):
        route = Route(seed=seed_for(fork, carla, road))
        drive_to(route, fork, carla, 10.0, lane_id=-1)
        # half-way over the lane line the car is still on the plan (no flapping) ...
        loc = carla.Location(x=20.0, y=lane_y(-1) + 0.5 * LANE_WIDTH, z=0.0)
        route.update(loc.x, loc.y, 0.0, lambda loc=loc: fork.get_waypoint(loc))
        assert route.replans == 0
        # ... and in the right lane the plan is made again from that lane, to the same exit road
        drive_to(route, fork, carla, 24.0, lane_id=-2)
        assert route.replans == 1
        assert route.nodes[0].wp.lane_id == -2 and exit_road(route) == road
        assert route.planned_exit(JUNCTION) == (road, -2)


def test_neighbour_lane_follows_the_plan_exit(fork: Any, carla: Any) -> None:
    for road in (ROAD_STRAIGHT, ROAD_LEFT):
        route = Route(seed=seed_for(fork, carla, road))
        drive_to(route, fork, carla, 30.0)
        neighbour = fork.get_waypoint(carla.Location(x=30.0, y=lane_y(-2)))
        wps = route.follow(neighbour, 60.0)
        assert len(wps) == 31
        assert {w.road_id for w in wps} <= {1, 2, 3, road} and wps[-1].road_id == road and wps[-1].lane_id == -2


def test_traffic_manager_choice_is_followed(fork: Any, carla: Any) -> None:
    route = Route(seed=seed_for(fork, carla, ROAD_STRAIGHT))
    drive_to(route, fork, carla, 40.0)
    loc = carla.Location(x=40.0, y=lane_y(-1))
    here = fork.get_waypoint(loc)
    # The Traffic Manager's action buffer: where it is, then its (left) turn in the junction, as
    # get_all_actions gives them: [road option, carla.Waypoint]
    entry = fork.get_waypoint(carla.Location(x=49.0, y=lane_y(-1))).next(2.0)
    turn = next(b for b in entry if exit_of(b)[0] == ROAD_LEFT)
    agreeing = [["LaneFollow", here], ["Straight", next(b for b in entry if exit_of(b)[0] == ROAD_STRAIGHT)]]
    assert not route.follow_actions(agreeing, lambda: fork.get_waypoint(loc))
    assert route.tm_divergences == 0 and exit_road(route) == ROAD_STRAIGHT
    revision = route.revision
    assert route.follow_actions([["LaneFollow", here], ["Left", turn], ["LaneFollow", turn.next(30.0)[0]]],
                                lambda: fork.get_waypoint(loc))
    assert route.tm_divergences == 1 and route.revision > revision
    assert exit_road(route) == ROAD_LEFT
    assert all(fork.get_waypoint(carla.Location(x=x, y=y, z=z)).road_id == ROAD_LEFT for x, y, z in route.tm_path())
    # and it sticks: the next tick does not flip back
    assert not drive_to(route, fork, carla, 42.0) and exit_road(route) == ROAD_LEFT


def test_choices_are_forgotten_behind_the_car(fork: Any, carla: Any) -> None:
    route = Route(seed=seed_for(fork, carla, ROAD_LEFT))
    drive_to(route, fork, carla, 10.0)
    assert ("junction", JUNCTION) in route.choices
    # follow the plan through the turn onto road 5
    for node in list(route.nodes[:45]):
        wp_loc = node.wp.transform.location
        route.update(node.x, node.y, node.yaw, lambda wp_loc=wp_loc: fork.get_waypoint(wp_loc))
    assert route.replans == 0 and route.nodes[0].wp.road_id == ROAD_LEFT
    assert ("junction", JUNCTION) not in route.choices


def test_car_off_every_lane_is_replanned_from_its_waypoint(fork: Any, carla: Any) -> None:
    route = Route(seed=1)
    drive_to(route, fork, carla, 10.0)
    # the car turned around (heading 180 deg off the lane): not on the plan any more
    loc = carla.Location(x=12.0, y=lane_y(-1))
    calls: list[Any] = []

    def locate() -> Any:
        calls.append(loc)
        return fork.get_waypoint(loc)

    route.update(loc.x, loc.y, 180.0, locate)
    assert calls and route.replans == 1


def test_route_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="step"):
        Route(step=0.0)
    with pytest.raises(ValueError, match="horizon"):
        Route(step=5.0, horizon=4.0)
    assert Route().polyline().shape == (0, 2) and Route().tm_path() == []
    np.testing.assert_array_equal(Route().ahead(10.0), [])
