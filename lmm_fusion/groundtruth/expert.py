"""Rule-based ground truth: the transparent expert whose labels define the learning task.

The expert sees the true scene in road (Frenet) terms: ego speed, every object's longitudinal gap to
the ego front bumper, lateral offset from the ego lane centre and speed along the road, the lanes
beside the ego and the traffic light ahead. Its rules are written out in ``docs/synthetic_world.md``;
the constants below are the numbers those rules quote. Units: metres, seconds, m/s, m/s^2.

Why the labels need every sensor:
- ego speed (GNSS only) enters every threshold: TTC, stopping distances, headway;
- gaps and which lanes are occupied come from geometry (LiDAR is exact, the camera is poor at night);
- the light's colour is visible only to the camera.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.rig import DEFAULT_VEHICLE, VehicleGeometry
from lmm_fusion.base.vocabulary import Action, Light, Risk

#: Objects farther than this ahead of the front bumper are not considered [m].
DETECT_RANGE = 60.0
#: Traffic lights whose stop line is farther than this are "no light ahead" (Light.NONE) [m].
LIGHT_RANGE = 70.0
#: Cruise speed the expert suggests on a free road [m/s] (54 km/h, an urban arterial).
CRUISE_SPEED = 15.0
#: Reaction time and comfortable / emergency deceleration used in stopping distances.
REACTION_TIME = 0.5
A_COMFORT = 3.0
A_EMERGENCY = 7.0
#: TTC thresholds [s]: below TTC_HIGH the risk is HIGH; below TTC_STOP only a stop is safe
#: (no time to change lanes); below TTC_MEDIUM the risk is at least MEDIUM.
TTC_HIGH = 2.0
TTC_STOP = 1.5
TTC_MEDIUM = 5.0
#: A lead object slower than this along the road is "stopped" [m/s].
STOPPED_SPEED = 0.5
#: Extra margin added to the comfortable stopping distance before STOP replaces SLOW_DOWN [m].
STOP_MARGIN = 8.0
#: Red light: STOP when the stop line is closer than comfortable stopping distance + this [m].
RED_STOP_MARGIN = 15.0
#: Ego corridor half-width margin beyond the ego's own half-width [m].
CORRIDOR_MARGIN = 0.3
#: A neighbouring lane must be free from this far behind the ego rear ... [m]
LANE_FREE_BEHIND = 8.0
#: ... to this far beyond the obstacle to pass [m].
LANE_FREE_BEYOND = 10.0


@dataclass(frozen=True)
class Obstacle:
    """One object in road terms, relative to the ego.

    ``gap``: longitudinal distance from the ego front bumper to the object's near face [m]
    (negative: the object's near face is behind the bumper); ``length``: its extent along the road;
    ``lateral``: offset of its centre from the ego lane centre [m, +left]; ``half_width``: its
    half extent across the road [m]; ``speed``: its speed along the road [m/s];
    ``kind``: "vehicle", "pedestrian", "obstacle", ...; ``lamps``: the rear lamps the expert reacts
    to ("brake", "left"/"right" turn signal; "" when lamp cues are off or none are lit).
    """

    gap: float
    lateral: float
    half_width: float
    speed: float = 0.0
    length: float = 4.5
    kind: str = "obstacle"
    lamps: str = ""


@dataclass(frozen=True)
class ExpertInput:
    """What the expert looks at. ``lanes_left``/``lanes_right``: lanes beside the ego lane;
    ``light``: ``(stop-line distance from the front bumper [m], Light)`` or None;
    ``road_half_width``: lateral extent of the carriageway from the ego lane centre, as
    ``(to the right edge, to the left edge)`` [m] (pedestrians on the carriageway matter);
    ``vehicle``: the ego's length and width (gaps are already measured from its front bumper)."""

    ego_speed: float
    obstacles: Sequence[Obstacle] = ()
    lane_width: float = 3.5
    lanes_left: int = 1
    lanes_right: int = 1
    light: tuple[float, Light] | None = None
    road_edges: tuple[float, float] = (-5.25, 5.25)
    #: The ego's footprint: its width sets the corridor, its length how far behind a free lane must reach.
    vehicle: VehicleGeometry = DEFAULT_VEHICLE


@dataclass(frozen=True)
class Label:
    """Expert output for one frame. ``ttc``/``distance`` are +inf when nothing is ahead."""

    risk: Risk
    action: Action
    target_speed: float
    ttc: float
    distance: float
    light: Light
    rationale: str
    free_left: bool = False
    free_right: bool = False
    details: dict[str, float] = field(default_factory=dict)


def comfortable_stop_distance(v: float) -> float:
    """Reaction + comfortable braking distance at speed ``v`` [m]."""
    return v * REACTION_TIME + v * v / (2.0 * A_COMFORT)


def emergency_stop_distance(v: float) -> float:
    """Braking distance at emergency deceleration, no reaction time [m]."""
    return v * v / (2.0 * A_EMERGENCY)


def in_ego_corridor(o: Obstacle, vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> bool:
    """True when the object overlaps the swept path of the ego (ego width + margin)."""
    return abs(o.lateral) < o.half_width + vehicle.width / 2.0 + CORRIDOR_MARGIN


def lane_free(inp: ExpertInput, side: int, beyond: float) -> bool:
    """Whether the lane on ``side`` (+1 left, -1 right) exists and has no object that intrudes
    into it (by more than 0.3 m) from ``LANE_FREE_BEHIND`` m behind the ego rear to ``beyond`` m
    ahead of the front bumper."""
    if (inp.lanes_left if side > 0 else inp.lanes_right) < 1:
        return False
    centre = side * inp.lane_width
    for o in inp.obstacles:
        if abs(o.lateral - centre) >= o.half_width + inp.lane_width / 2.0 - 0.3:
            continue
        far_face = o.gap + o.length
        if far_face > -(inp.vehicle.length + LANE_FREE_BEHIND) and o.gap < beyond:
            return False
    return True


_SEVERITY = {Action.KEEP_LANE: 0, Action.CHANGE_LANE_LEFT: 1, Action.CHANGE_LANE_RIGHT: 1,
             Action.FOLLOW: 2, Action.SLOW_DOWN: 3, Action.STOP: 4}


def _slow_speed(v: float, room: float) -> float:
    """Speed from which a comfortable stop fits in ``room`` metres (capped at the current speed)."""
    return float(min(v, math.sqrt(2.0 * A_COMFORT * max(room, 0.0))))


def following_range(v: float) -> float:
    """Distance [m] within which a moving vehicle ahead is followed (3 s of travel + 10 m)."""
    return 3.0 * v + 10.0


def signals_into_ego_lane(o: Obstacle, vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> bool:
    """A vehicle beside the ego lane whose turn signal points towards it."""
    towards = (o.lamps == "left" and o.lateral < 0) or (o.lamps == "right" and o.lateral > 0)
    return not in_ego_corridor(o, vehicle) and towards


def assess(inp: ExpertInput) -> Label:
    """Apply the rules of ``docs/synthetic_world.md`` to one frame."""
    v = max(0.0, float(inp.ego_speed))
    d_comf = comfortable_stop_distance(v)
    # --- nearest object in the ego corridor ahead
    ahead = [o for o in inp.obstacles
             if in_ego_corridor(o, inp.vehicle) and o.gap + o.length > 0.0 and o.gap < DETECT_RANGE]
    lead = min(ahead, key=lambda o: o.gap) if ahead else None
    distance = max(0.0, lead.gap) if lead else math.inf
    ttc = math.inf
    if lead is not None:
        closing = v - lead.speed
        if closing > 0.1:
            ttc = distance / closing
    # --- traffic light ahead
    light = Light.NONE
    light_dist = math.inf
    if inp.light is not None and 0.0 <= inp.light[0] <= LIGHT_RANGE:
        light_dist, light = float(inp.light[0]), Light(inp.light[1])
    free_left = free_right = False

    candidates: list[tuple[Action, float, str]] = []
    risk = Risk.LOW
    why: list[str] = []

    if lead is not None:
        what = f"{lead.kind} {distance:.1f} m ahead"
        # a moving lead within following range showing brake lamps (lamp cues only)
        lead_braking = lead.lamps == "brake" and lead.speed >= STOPPED_SPEED and distance < following_range(v)
        if lead.kind == "pedestrian" or lead.speed < STOPPED_SPEED:
            beyond = distance + lead.length + LANE_FREE_BEYOND
            free_left = lane_free(inp, +1, beyond)
            free_right = lane_free(inp, -1, beyond)
            if ttc < TTC_STOP:
                candidates.append((Action.STOP, 0.0, f"stop: stopped {what}, TTC {ttc:.1f} s"))
            elif lead.kind != "pedestrian" and free_left:
                candidates.append((Action.CHANGE_LANE_LEFT, min(v, CRUISE_SPEED), f"pass left: {what}"))
            elif lead.kind != "pedestrian" and free_right:
                candidates.append((Action.CHANGE_LANE_RIGHT, min(v, CRUISE_SPEED), f"pass right: {what}"))
            elif distance <= d_comf + STOP_MARGIN:
                candidates.append((Action.STOP, 0.0, f"stop: {what}, lane blocked"))
            else:
                candidates.append((Action.SLOW_DOWN, _slow_speed(v, distance - STOP_MARGIN),
                                   f"slow down: {what}, lane blocked"))
        else:
            headway = distance / v if v > 0.1 else math.inf
            if ttc < TTC_STOP:
                candidates.append((Action.STOP, 0.0, f"stop: closing on {what}, TTC {ttc:.1f} s"))
            elif ttc < 4.0 or headway < 1.0:
                candidates.append((Action.SLOW_DOWN, float(min(v, lead.speed)),
                                   f"slow down: {what}, TTC {ttc:.1f} s, headway {headway:.1f} s"))
            elif lead_braking:
                # its brake lamps announce the deceleration before the gap shows it
                candidates.append((Action.SLOW_DOWN, float(min(v, lead.speed)), f"slow down: {what} braking"))
            elif distance < following_range(v):
                candidates.append((Action.FOLLOW, float(lead.speed), f"follow {what} at {lead.speed:.1f} m/s"))
        if ttc < TTC_HIGH:
            risk = Risk.HIGH
            why.append(f"TTC {ttc:.1f} s")
        elif ttc < TTC_MEDIUM or distance < max(10.0, 2.0 * v):
            risk = Risk.MEDIUM
            why.append(f"{what}")
        elif lead_braking:
            risk = Risk.MEDIUM
            why.append(f"{what} braking")

    # --- a vehicle beside the ego lane signalling into it: make room before it steers
    for o in inp.obstacles:
        if o.kind == "vehicle" and signals_into_ego_lane(o, inp.vehicle) and 0.0 <= o.gap < following_range(v):
            candidates.append((Action.SLOW_DOWN, float(min(v, o.speed)),
                               f"slow down: {o.kind} {o.gap:.1f} m ahead signalling into the lane"))
            risk = max(risk, Risk.MEDIUM)
            why.append("vehicle signalling into the lane")
            break

    # --- pedestrians on the carriageway but not (yet) in the ego corridor
    for o in inp.obstacles:
        if o.kind != "pedestrian" or o is lead or not (0.0 <= o.gap < DETECT_RANGE):
            continue
        if inp.road_edges[0] <= o.lateral <= inp.road_edges[1] and o.gap < d_comf + RED_STOP_MARGIN:
            candidates.append((Action.SLOW_DOWN, _slow_speed(v, o.gap - 2.0),
                               f"slow down: pedestrian on the road {o.gap:.1f} m ahead"))
            risk = max(risk, Risk.MEDIUM)
            why.append("pedestrian on the road")
            break

    # --- traffic light
    if light in (Light.RED, Light.YELLOW):
        if light == Light.RED:
            if light_dist <= d_comf + RED_STOP_MARGIN:
                candidates.append((Action.STOP, 0.0, f"stop: red light {light_dist:.1f} m ahead"))
            else:
                candidates.append((Action.SLOW_DOWN, _slow_speed(v, light_dist - RED_STOP_MARGIN),
                                   f"slow down: red light {light_dist:.1f} m ahead"))
        elif d_comf <= light_dist:  # yellow and a comfortable stop still fits before the line
            candidates.append((Action.STOP, 0.0, f"stop: yellow light {light_dist:.1f} m ahead"))
        if light_dist < d_comf + RED_STOP_MARGIN:
            if emergency_stop_distance(v) > light_dist and v > 2.0 and light == Light.RED:
                risk = Risk.HIGH
                why.append("cannot stop before red light")
            elif light == Light.RED or d_comf <= light_dist:
                risk = max(risk, Risk.MEDIUM)
                why.append(f"{light.name.lower()} light")

    if candidates:
        action, target, rationale = max(candidates, key=lambda c: _SEVERITY[c[0]])
    else:
        action, target = Action.KEEP_LANE, CRUISE_SPEED
        rationale = "keep lane: road ahead free" + (" (green light)" if light == Light.GREEN else "")
    if why:
        rationale += f" [risk {risk.name.lower()}: {', '.join(why)}]"
    return Label(risk=Risk(risk), action=action, target_speed=float(target), ttc=float(ttc),
                 distance=float(distance), light=light, rationale=rationale,
                 free_left=free_left, free_right=free_right)


def occupancy(centers_xy: np.ndarray, yaws: np.ndarray, sizes_lw: np.ndarray,
              grid: BevGrid = OCCUPANCY_GRID) -> np.ndarray:
    """Ground-truth occupancy on ``grid`` (base_link): 100 where an object footprint covers a cell,
    0 elsewhere.

    ``centers_xy`` (N, 2) footprint centres [m], ``yaws`` (N,) [rad], ``sizes_lw`` (N, 2) length/width
    [m]. A cell is occupied when its centre lies in a footprint or a footprint sample point (0.25 m
    spacing, so thin objects such as poles are not missed) falls inside it. Returns (ny, nx) int8.
    """
    out = np.zeros(grid.shape, dtype=np.int8)
    xc, yc = grid.centers()
    step = 0.25
    for (cx, cy), yaw, (ln, wd) in zip(np.asarray(centers_xy), np.asarray(yaws), np.asarray(sizes_lw)):
        r = 0.5 * math.hypot(ln, wd)
        if cx + r < grid.x_min or cx - r > grid.x_max or cy + r < grid.y_min or cy - r > grid.y_max:
            continue
        c, s = math.cos(yaw), math.sin(yaw)
        # cell centres inside the box
        dx, dy = xc - cx, yc - cy
        u, w = c * dx + s * dy, -s * dx + c * dy
        inside = (np.abs(u) <= ln / 2) & (np.abs(w) <= wd / 2)
        out[inside] = 100
        # footprint samples
        us = np.linspace(-ln / 2, ln / 2, max(2, int(ln / step) + 1))
        ws = np.linspace(-wd / 2, wd / 2, max(2, int(wd / step) + 1))
        uu, ww = np.meshgrid(us, ws)
        px = cx + c * uu - s * ww
        py = cy + s * uu + c * ww
        iy, ix, ok = grid.indices(px.ravel(), py.ravel())
        out[iy[ok], ix[ok]] = 100
    return out
