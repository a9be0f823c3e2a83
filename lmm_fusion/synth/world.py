"""The synthetic driving world: road, actors, traffic lights, scenario families and the ego.

Geometry lives in road (Frenet) coordinates within an episode: ``s`` along the road [m],
``d`` across it [m, +left], measured from the road's reference line, which runs along the right
road edge + half the carriageway (the road centre). The road is a constant-curvature arc
(``kappa`` [1/m], 0 = straight) with ``n_lanes`` lanes of ``lane_width``, all driving in +s.
Lane ``i`` (0 = rightmost) has its centre at ``d = (i - (n_lanes - 1) / 2) * lane_width``.

The ego drives along the centre of its lane (it never changes lanes: the labels *suggest*). Its
speed follows a random profile drawn independently of the scene (so only GNSS reveals it), capped
by a safety envelope so it brakes for obstacles and red lights instead of driving through them.
The ego's pose in ``map`` is integrated from its speed and yaw rate across the whole drive and is
continuous through episode resets; the scene around it is rebuilt at each episode start.

:meth:`World.scene` gives a :class:`Scene`: everything in ``base_link`` (REP-103) for the sensor
models, plus the expert's road-frame view (:class:`lmm_fusion.groundtruth.expert.ExpertInput`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmm_fusion.base.rig import DEFAULT_VEHICLE, VehicleGeometry
from lmm_fusion.base.vocabulary import Light, Scenario
from lmm_fusion.groundtruth.expert import ExpertInput, Label, Obstacle, assess

#: Reflectivity of each material in [0, 1] (drives LiDAR intensity; independent of paint colour).
REFLECTIVITY: dict[str, float] = {
    "asphalt": 0.08, "paint": 0.55, "ground": 0.15, "vehicle": 0.35, "pedestrian": 0.22,
    "obstacle": 0.45, "building": 0.25, "pole": 0.30, "housing": 0.18,
}
#: Largest simulation step [s]; sensor times in between are reached exactly.
MAX_STEP = 0.02
#: Ego envelope deceleration [m/s^2] and standstill gap to an obstacle [m].
ENVELOPE_DECEL = 6.0
ENVELOPE_GAP = 2.5
#: Ego speed profile: target speeds U(V_MIN, V_MAX) [m/s], redrawn every U(2, 5) s and at resets.
V_MIN = 0.0
V_MAX = 20.0
A_ACCEL = 2.5
A_DECEL = 3.5
#: How the traffic-light housing faces the road: its lamps are on the face towards -s.
LAMP_RADIUS = 0.11
#: A cutting-in vehicle starts its lane change only with its rear at least this far ahead of the ego [m].
CUT_IN_GAP = 3.0
#: A vehicle slower than this shows brake lamps (stopped in traffic) [m/s].
STOPPED_LAMP_SPEED = 0.5
#: With lamp cues, a cutting-in driver switches the turn signal on this long before steering [s].
SIGNAL_LEAD = 1.5
LAMP_SPACING = 0.3


@dataclass(frozen=True)
class Lighting:
    """Illumination of an episode. Colours are RGB 0..255; ``gain`` scales surface colours,
    ``contrast`` blends them towards their mean (1 = full contrast), ``noise_std`` is the
    camera's per-pixel noise [DN]."""

    name: str
    sky_top: tuple[int, int, int]
    sky_horizon: tuple[int, int, int]
    gain: float
    contrast: float
    noise_std: float
    sun: tuple[float, float, float]  # direction *towards* the light, base_link-ish (x fwd, y left, z up)


LIGHTINGS: dict[str, Lighting] = {
    "day": Lighting("day", (90, 140, 215), (185, 210, 235), 1.0, 1.0, 2.5, (0.3, 0.5, 0.81)),
    "dusk": Lighting("dusk", (70, 60, 110), (235, 150, 90), 0.6, 0.75, 4.0, (0.8, -0.3, 0.2)),
    "night": Lighting("night", (8, 10, 22), (22, 24, 38), 0.22, 0.45, 6.0, (0.0, 0.0, 1.0)),
}


@dataclass
class Actor:
    """A box-shaped thing in road coordinates. ``s``/``d``: footprint centre [m]; ``z0``: height of
    its bottom [m]; ``length`` along its heading, ``width`` across, ``height`` [m]; ``yaw``: heading
    relative to the road [rad]; ``vs``/``vd``: velocity along/across the road [m/s]."""

    kind: str
    s: float
    d: float
    length: float
    width: float
    height: float
    color: tuple[int, int, int]
    z0: float = 0.0
    yaw: float = 0.0
    vs: float = 0.0
    vd: float = 0.0
    material: str = ""
    # behaviour (times relative to the episode start)
    brake_at: float = math.inf
    decel: float = 0.0
    cut_at: float = math.inf
    cut_duration: float = 2.0
    d_from: float = 0.0
    d_to: float = 0.0
    walk_at: float = math.inf
    walk_speed: float = 0.0
    d_stop: float = 0.0
    hazard: bool = False  # a broken-down / parked vehicle: hazard lamps on
    indicates: bool = False  # signals its lane change (lamp cues on) from SIGNAL_LEAD s before it

    def __post_init__(self) -> None:
        if not self.material:
            self.material = self.kind

    def step(self, t_rel: float, dt: float) -> None:
        """Advance by ``dt`` [s]; ``t_rel`` is the episode time at the step's start."""
        if t_rel >= self.brake_at:
            self.vs = max(0.0, self.vs - self.decel * dt)
        if self.cut_at <= t_rel < self.cut_at + self.cut_duration:
            # smooth (cosine) lateral profile from d_from to d_to
            def lat(tt: float) -> float:
                u = min(max((tt - self.cut_at) / self.cut_duration, 0.0), 1.0)
                return self.d_from + (self.d_to - self.d_from) * 0.5 * (1.0 - math.cos(math.pi * u))
            self.vd = (lat(t_rel + dt) - lat(t_rel)) / dt
            self.yaw = math.atan2(self.vd, max(self.vs, 1.0))
        elif t_rel >= self.cut_at + self.cut_duration and self.vd != 0.0 and self.kind == "vehicle":
            self.vd, self.yaw, self.d = 0.0, 0.0, self.d_to
        if self.kind == "pedestrian" and t_rel >= self.walk_at:
            self.vd = self.walk_speed
            if (self.walk_speed > 0 and self.d >= self.d_stop) or (self.walk_speed < 0 and self.d <= self.d_stop):
                self.vd = 0.0
                self.walk_at = math.inf
        self.s += self.vs * dt
        self.d += self.vd * dt

    def signal(self, t_rel: float) -> str:
        """Rear lamps a vehicle shows (camera only): hazard when broken down, "left"/"right" while it
        signals a lane change towards that side, brake when braking or stopped in traffic, tail lamps
        otherwise."""
        if self.kind != "vehicle":
            return ""
        if self.hazard:
            return "hazard"
        if self.indicates and self.cut_at - SIGNAL_LEAD <= t_rel < self.cut_at + self.cut_duration:
            return "left" if self.d_to > self.d_from else "right"  # +d is left of the road direction
        if self.vs < STOPPED_LAMP_SPEED or (t_rel >= self.brake_at and self.decel > 0):
            return "brake"
        return "tail"

    def half_extents_sd(self) -> tuple[float, float]:
        """Half extents of the footprint along and across the road [m]."""
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        return (self.length / 2 * c + self.width / 2 * s, self.length / 2 * s + self.width / 2 * c)


@dataclass
class TrafficLight:
    """Light governing all lanes at stop line ``s_stop``; ``schedule`` lists (episode time, state)
    changes, the first at time 0; ``housings`` are indices of its housing actors."""

    s_stop: float
    schedule: list[tuple[float, Light]]
    housings: list[int] = field(default_factory=list)

    def state(self, t_rel: float) -> Light:
        current = self.schedule[0][1]
        for t0, st in self.schedule:
            if t_rel >= t0:
                current = st
        return current


@dataclass
class Episode:
    """One scenario episode: the road, actors, lights and lighting from ``t_start`` for ``duration``."""

    scenario: Scenario
    t_start: float
    duration: float
    kappa: float
    lane_width: float
    n_lanes: int
    ego_lane: int
    lighting: Lighting
    actors: list[Actor]
    lights: list[TrafficLight]
    crosswalks: list[float]
    camera_exposure: float = 1.0
    noise_scale: float = 1.0  # multiplies camera pixel noise and LiDAR range noise
    lidar_dropout: float | None = None  # None: the rig's dropout

    def lane_centre(self, lane: int) -> float:
        return (lane - (self.n_lanes - 1) / 2.0) * self.lane_width

    @property
    def half_road(self) -> float:
        return self.n_lanes * self.lane_width / 2.0


@dataclass(frozen=True)
class Boxes:
    """Oriented boxes in ``base_link``: ``center`` (N, 3) box centre [m], ``yaw`` (N,) [rad],
    ``size`` (N, 3) length/width/height [m], ``color`` (N, 3) uint8 RGB, ``reflectivity`` (N,),
    ``kind`` names, ``velocity`` (N, 2) over ground in base_link axes [m/s], ``signal``: rear lamps
    of vehicles ("" none, "tail", "brake", "hazard"; empty tuple = none for all)."""

    center: np.ndarray
    yaw: np.ndarray
    size: np.ndarray
    color: np.ndarray
    reflectivity: np.ndarray
    kind: tuple[str, ...]
    velocity: np.ndarray
    signal: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.kind)


@dataclass(frozen=True)
class Lamp:
    """Traffic-light lamp centre in ``base_link`` [m], facing direction (unit, base_link), colour
    name ("red", "yellow", "green") and whether it is lit."""

    center: np.ndarray
    normal: np.ndarray
    colour: str
    lit: bool


@dataclass(frozen=True)
class RoadView:
    """Road seen from the ego: curvature [1/m], lane width [m], lane count, ego lane index,
    ego lateral offset from the road centre ``d_ego`` [m] and ego arc position ``s_ego`` [m]
    (phase of the dashed markings)."""

    kappa: float
    lane_width: float
    n_lanes: int
    ego_lane: int
    d_ego: float
    s_ego: float

    def to_base(self, ds: np.ndarray, d: np.ndarray, z: np.ndarray | float = 0.0) -> np.ndarray:
        """Road coordinates (``ds`` ahead of base_link along the road, ``d`` from the road centre)
        -> base_link points (..., 3). The ego sits at ``(0, d_ego)`` heading along the road."""
        return road_to_base(np.asarray(ds, float), np.asarray(d, float), self.kappa, self.d_ego, z)


def road_to_base(ds: np.ndarray, d: np.ndarray, kappa: float, d_ego: float,
                 z: np.ndarray | float = 0.0) -> np.ndarray:
    """Map road coordinates relative to the ego to base_link. Reference line arc with curvature
    ``kappa`` through ``(0, -d_ego)`` with heading 0; returns (..., 3) float64."""
    ds, d = np.broadcast_arrays(ds, d)
    th = kappa * ds
    if abs(kappa) < 1e-9:
        px, py = ds, np.zeros_like(ds)
    else:
        px, py = np.sin(th) / kappa, (1.0 - np.cos(th)) / kappa
    x = px - d * np.sin(th)
    y = py - d_ego + d * np.cos(th)
    zz = np.broadcast_to(np.asarray(z, float), x.shape)
    return np.stack([x, y, zz], axis=-1)


@dataclass(frozen=True)
class Scene:
    """Snapshot of the world at time ``t`` [s] for the sensor models and the expert."""

    t: float
    scenario: Scenario
    lighting: Lighting
    exposure: float
    road: RoadView
    boxes: Boxes
    lamps: tuple[Lamp, ...]
    stop_lines: tuple[float, ...]  # ds ahead of base_link [m]
    crosswalks: tuple[float, ...]  # ds of the crosswalk centre ahead of base_link [m]
    ego_speed: float  # [m/s]
    ego_accel: float  # [m/s^2]
    ego_pose: tuple[float, float, float]  # map x, y [m], yaw [rad]
    ego_yaw_rate: float  # [rad/s]
    expert_input: ExpertInput
    noise_scale: float = 1.0  # multiplies camera pixel noise and LiDAR range noise
    lidar_dropout: float | None = None  # None: the rig's dropout

    def label(self) -> Label:
        return assess(self.expert_input)


def _color(rng: np.random.Generator, lo: int = 20, hi: int = 240) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, size=3)
    return (int(c[0]), int(c[1]), int(c[2]))


def _grey(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    g = int(rng.integers(lo, hi))
    tint = rng.integers(-12, 13, size=3)
    c = np.clip(g + tint, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _vehicle(rng: np.random.Generator, s: float, d: float, vs: float) -> Actor:
    if rng.random() < 0.2:  # van / truck
        ln, wd, ht = rng.uniform(5.5, 9.0), rng.uniform(2.1, 2.5), rng.uniform(2.3, 3.4)
    else:
        ln, wd, ht = rng.uniform(3.8, 5.0), rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.8)
    return Actor("vehicle", s + ln / 2, d + rng.uniform(-0.25, 0.25), ln, wd, ht, _color(rng), vs=vs)


def _static_obstacle(rng: np.random.Generator, s: float, d: float) -> Actor:
    """A stopped car (half of the time) or a box (debris, crate, barrier) at near face ``s``."""
    if rng.random() < 0.5:
        a = _vehicle(rng, s, d, 0.0)
        a.yaw = rng.uniform(-0.15, 0.15)
        a.hazard = True
        return a
    ln, wd, ht = rng.uniform(0.6, 3.0), rng.uniform(0.6, 2.2), rng.uniform(0.5, 1.8)
    return Actor("obstacle", s + ln / 2, d + rng.uniform(-0.4, 0.4), ln, wd, ht, _color(rng),
                 yaw=rng.uniform(-0.3, 0.3))


class World:
    """Episodes of scenario families on one continuous ego drive.

    ``rng`` (numpy Generator) is the only source of randomness, so a seed fixes the drive.
    ``scenarios`` are cycled in order; each episode lasts U(6, 10) s. ``lamp_cues`` (on by default;
    off gives the older world without them): cutting-in drivers signal first, and the expert reacts
    to the lamps it sees (a braking lead, a neighbour signalling into the ego lane;
    ``docs/synthetic_world.md``); it draws no extra random numbers, so a seed gives the same scenes
    with and without it. ``vehicle``: the ego's footprint (the rig's ``vehicle``).
    """

    def __init__(self, rng: np.random.Generator, scenarios: Sequence[Scenario] | None = None,
                 t0: float = 0.0, lamp_cues: bool = True, vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> None:
        self.rng = rng
        # The ego's footprint: gaps, contacts and the expert's corridor are measured from its bumper.
        self.vehicle = vehicle
        self.lamp_cues = lamp_cues
        self.scenarios = list(scenarios) if scenarios else list(Scenario)
        self.t = t0
        self.episode_index = -1
        # ego state
        self.s = 0.0
        self.v = float(rng.uniform(3.0, V_MAX))
        self.a = 0.0
        self.v_target = self.v
        self.next_target_change = t0
        self.map_x = 0.0
        self.map_y = 0.0
        self.map_yaw = float(rng.uniform(-math.pi, math.pi))
        self.episode: Episode = self._new_episode(t0)

    # ----------------------------------------------------------------- episodes
    def _new_episode(self, t_start: float) -> Episode:
        rng = self.rng
        self.episode_index += 1
        scenario = self.scenarios[self.episode_index % len(self.scenarios)]
        self.s = 0.0
        n_lanes = int(rng.choice([2, 3, 3]))
        lane_width = float(rng.uniform(3.2, 3.8))
        ego_lane = int(rng.integers(0, n_lanes))
        kappa = 0.0 if rng.random() < 0.5 else float(rng.choice([-1, 1]) * rng.uniform(1 / 1200, 1 / 300))
        lighting = LIGHTINGS[str(rng.choice(["day", "day", "dusk", "night"]))]
        ep = Episode(scenario, t_start, float(rng.uniform(6.0, 10.0)), kappa, lane_width, n_lanes, ego_lane,
                     lighting, [], [], [], camera_exposure=float(rng.uniform(0.85, 1.15)),
                     # sensor noise varies per episode; 0.1 steps keep the camera's noise-tile cache small
                     noise_scale=round(float(rng.uniform(0.7, 1.5)), 1),
                     lidar_dropout=float(rng.uniform(0.005, 0.03)))
        # redraw the ego's target speed: independent of whatever the scene will be
        self.v_target = float(rng.uniform(V_MIN, V_MAX)) if rng.random() > 0.1 else 0.0
        self.next_target_change = t_start + float(rng.uniform(2.0, 5.0))
        self._populate(ep)
        self._buildings(ep)
        return ep

    def _lane_traffic(self, ep: Episode, lanes: Sequence[int], p: float = 0.6) -> None:
        """Maybe one moving vehicle in each of ``lanes`` somewhere around the ego."""
        for lane in lanes:
            if self.rng.random() < p:
                ep.actors.append(_vehicle(self.rng, float(self.rng.uniform(-25, 70)), ep.lane_centre(lane),
                                          float(self.rng.uniform(4.0, 18.0))))

    def _populate(self, ep: Episode) -> None:
        rng = self.rng
        front = self.vehicle.front_offset
        e = ep.ego_lane
        left = e + 1 if e + 1 < ep.n_lanes else None
        right = e - 1 if e >= 1 else None
        neighbours = [x for x in (left, right) if x is not None]
        others = [i for i in range(ep.n_lanes) if i != e]
        d_e = ep.lane_centre(e)
        sc = ep.scenario
        if sc == Scenario.FREE_ROAD:
            self._lane_traffic(ep, others)
            if rng.random() < 0.35:  # a green light: the camera must confirm it is green
                light = TrafficLight(front + float(rng.uniform(15.0, 65.0)), [(0.0, Light.GREEN)])
                self._light_poles(ep, light)
                ep.lights.append(light)
        elif sc == Scenario.LEAD_VEHICLE:
            lead = _vehicle(rng, front + float(rng.uniform(8.0, 45.0)), d_e, float(rng.uniform(2.0, 14.0)))
            if rng.random() < 0.5:
                lead.brake_at = float(rng.uniform(0.5, 5.0))
                lead.decel = float(rng.uniform(2.0, 6.0))
            ep.actors.append(lead)
            self._lane_traffic(ep, others, p=0.4)
            if rng.random() < 0.3:  # the lead drives through a green light ahead
                light = TrafficLight(front + float(rng.uniform(20.0, 65.0)), [(0.0, Light.GREEN)])
                self._light_poles(ep, light)
                ep.lights.append(light)
        elif sc in (Scenario.STOPPED_OBSTACLE_FREE_LEFT, Scenario.STOPPED_OBSTACLE_BLOCKED):
            s_obs = front + float(rng.uniform(15.0, 60.0))
            obs = _static_obstacle(rng, s_obs, d_e)
            ep.actors.append(obs)
            if sc == Scenario.STOPPED_OBSTACLE_BLOCKED:
                blocked = neighbours
            else:
                # keep one neighbour free (left preferred 60 % of the time when both exist)
                if left is not None and right is not None:
                    free = left if rng.random() < 0.6 else right
                else:
                    free = neighbours[0]
                blocked = [x for x in neighbours if x != free and rng.random() < 0.6]
                # traffic far from the ego in non-neighbouring lanes only
                self._lane_traffic(ep, [i for i in others if i not in neighbours], p=0.5)
            for lane in blocked:
                ep.actors.append(_static_obstacle(rng, s_obs + float(rng.uniform(-6.0, 6.0)), ep.lane_centre(lane)))
        elif sc == Scenario.PEDESTRIAN_CROSSING:
            s_c = front + float(rng.uniform(15.0, 55.0))
            ep.crosswalks.append(s_c)
            if rng.random() < 0.4:  # a signalised crossing: red for the traffic while people cross
                light = TrafficLight(s_c - 3.0, [(0.0, Light.RED)])
                self._light_poles(ep, light)
                ep.lights.append(light)
            for _ in range(int(rng.integers(1, 4))):
                side = 1 if rng.random() < 0.5 else -1
                start = side * (ep.half_road + float(rng.uniform(0.4, 1.5)))
                a = Actor("pedestrian", s_c + float(rng.uniform(-1.5, 1.5)), start, float(rng.uniform(0.35, 0.55)),
                          float(rng.uniform(0.45, 0.7)), float(rng.uniform(1.5, 1.95)), _color(rng),
                          yaw=-side * math.pi / 2)
                a.walk_at = float(rng.uniform(0.0, 3.0))
                a.walk_speed = -side * float(rng.uniform(0.9, 1.7))
                a.d_stop = -start
                ep.actors.append(a)
            self._lane_traffic(ep, others, p=0.3)
        elif sc == Scenario.TRAFFIC_LIGHT:
            s_stop = front + float(rng.uniform(10.0, 65.0))
            first = Light(int(rng.choice([Light.RED, Light.YELLOW, Light.GREEN], p=[0.3, 0.4, 0.3])))
            schedule = [(0.0, first)]
            if rng.random() < 0.35:
                t1 = float(rng.uniform(1.0, 5.0))
                if first == Light.GREEN:
                    schedule += [(t1, Light.YELLOW), (t1 + 3.0, Light.RED)]
                elif first == Light.RED:
                    schedule += [(t1, Light.GREEN)]
                else:
                    schedule += [(float(rng.uniform(2.5, 5.0)), Light.RED)]
            light = TrafficLight(s_stop, schedule)
            self._light_poles(ep, light)
            ep.lights.append(light)
            self._lane_traffic(ep, others, p=0.3)
        elif sc == Scenario.CUT_IN:
            lane = neighbours[int(rng.integers(0, len(neighbours)))]
            car = _vehicle(rng, front + float(rng.uniform(3.0, 25.0)), ep.lane_centre(lane),
                           float(max(1.0, self.v * rng.uniform(0.4, 0.9))))
            car.cut_at = float(rng.uniform(0.5, 3.0))
            car.cut_duration = float(rng.uniform(1.5, 3.0))
            car.d_from, car.d_to = car.d, d_e + float(rng.uniform(-0.2, 0.2))
            car.indicates = self.lamp_cues
            ep.actors.append(car)
            self._lane_traffic(ep, [i for i in others if i != lane], p=0.4)
        else:  # pragma: no cover - every family is handled above
            raise ValueError(f"unknown scenario {sc!r}")

    def _light_poles(self, ep: Episode, light: TrafficLight) -> None:
        """A roadside pole with a housing at the right edge just beyond the stop line, and a second pole
        15-25 m beyond it with a mast arm and a housing over the ego lane (far-side signal head, as in
        North American practice). Why the far side: a head hanging just past the line leaves the
        camera's view while the car is still 10 m before it, so a car waiting at the line could not
        see the state it waits for; the far-side head stays in view. LiDAR sees poles, arm and
        housings; only the camera sees the lamps."""
        rng = self.rng
        grey = _grey(rng, 60, 110)
        s_pole = light.s_stop + float(rng.uniform(1.0, 3.0))
        d_pole = -(ep.half_road + float(rng.uniform(0.8, 1.5)))
        ep.actors.append(Actor("pole", s_pole, d_pole, 0.2, 0.2, float(rng.uniform(3.6, 4.2)), grey))
        light.housings.append(len(ep.actors))
        ep.actors.append(Actor("housing", s_pole, d_pole + 0.35, 0.3, 0.38, 1.0, (25, 25, 25),
                               z0=float(rng.uniform(2.6, 3.2))))
        # far side: pole, mast arm over the ego lane and a housing hanging from it
        s_far = light.s_stop + float(rng.uniform(15.0, 25.0))
        d_far = -(ep.half_road + float(rng.uniform(0.8, 1.5)))
        pole_h = float(rng.uniform(5.2, 6.0))
        ep.actors.append(Actor("pole", s_far, d_far, 0.2, 0.2, pole_h, grey))
        d_h = ep.lane_centre(ep.ego_lane)
        arm_len = d_h - d_far + 0.5
        ep.actors.append(Actor("pole", s_far, d_far + arm_len / 2, 0.15, arm_len, 0.15, grey, z0=pole_h - 0.4,
                               material="pole"))
        light.housings.append(len(ep.actors))
        ep.actors.append(Actor("housing", s_far, d_h, 0.3, 0.38, 1.0, (25, 25, 25), z0=pole_h - 1.45))

    def _buildings(self, ep: Episode) -> None:
        """Roadside buildings along both sides for the whole episode (what the upper LiDAR beams hit)."""
        rng = self.rng
        reach = ep.duration * V_MAX + 160.0
        for side in (-1, 1):
            s = -40.0 + float(rng.uniform(0, 10))
            while s < reach:
                ln = float(rng.uniform(8.0, 25.0))
                depth = float(rng.uniform(6.0, 14.0))
                setback = ep.half_road + float(rng.uniform(3.0, 9.0))
                ep.actors.append(Actor("building", s + ln / 2, side * (setback + depth / 2), ln, depth,
                                       float(rng.uniform(4.0, 15.0)), _grey(rng, 80, 200)))
                s += ln + float(rng.uniform(2.0, 15.0))

    # ----------------------------------------------------------------- dynamics
    def _envelope_speed(self) -> float:
        """Highest speed from which the ego still stops short of what is ahead [m/s]."""
        ep = self.episode
        d_e = ep.lane_centre(ep.ego_lane)
        front = self.s + self.vehicle.front_offset
        cap = math.inf
        for a in ep.actors:
            hs, hd = a.half_extents_sd()
            if abs(a.d - d_e) >= hd + self.vehicle.width / 2 + 0.2:
                continue
            gap = a.s - hs - front
            if gap + 2 * hs < 0:
                continue
            room = max(gap - ENVELOPE_GAP, 0.0)
            cap = min(cap, math.sqrt(2 * ENVELOPE_DECEL * room + max(a.vs, 0.0) ** 2))
        t_rel = self.t - ep.t_start
        for light in ep.lights:
            st = light.state(t_rel)
            gap = light.s_stop - front
            # stop if it can still be done; otherwise (too close) go through
            if (st in (Light.RED, Light.YELLOW) and gap > -0.5
                    and self.v ** 2 / (2 * (ENVELOPE_DECEL + 1.0)) < gap + 0.5):
                cap = min(cap, math.sqrt(2 * ENVELOPE_DECEL * max(gap - 0.5, 0.0)))
        return cap

    def _step(self, dt: float) -> None:
        ep = self.episode
        t_rel = self.t - ep.t_start
        if self.t >= self.next_target_change:
            self.v_target = float(self.rng.uniform(V_MIN, V_MAX)) if self.rng.random() > 0.1 else 0.0
            self.next_target_change = self.t + float(self.rng.uniform(2.0, 5.0))
        a = float(np.clip(1.0 * (self.v_target - self.v), -A_DECEL, A_ACCEL))
        cap = self._envelope_speed()
        if self.v > cap:
            a = max(-9.0, min(a, (cap - self.v) / max(dt, 0.25)))
        v_new = max(0.0, self.v + a * dt)
        v_mid = 0.5 * (self.v + v_new)
        # an object that appeared closer than the ego can stop (or cut in too close) is hit: the
        # ego stops at contact (matching the object's speed) instead of driving through it
        contact = self._contact_limit()
        if self.s + v_mid * dt > contact:
            v_mid = max(0.0, (contact - self.s) / dt)
            v_new = min(v_new, v_mid)
        self.a = (v_new - self.v) / dt
        self.v = v_new
        self.s += v_mid * dt
        yaw_rate = ep.kappa * v_mid
        self.map_x += v_mid * dt * math.cos(self.map_yaw + 0.5 * yaw_rate * dt)
        self.map_y += v_mid * dt * math.sin(self.map_yaw + 0.5 * yaw_rate * dt)
        self.map_yaw = math.remainder(self.map_yaw + yaw_rate * dt, 2 * math.pi)
        front = self.s + self.vehicle.front_offset
        for actor in ep.actors:
            if actor.cut_at <= t_rel < actor.cut_at + dt and actor.s - actor.half_extents_sd()[0] - front < CUT_IN_GAP:
                # a driver cuts in only ahead of the ego: if the ego is alongside, wait (maybe forever)
                actor.cut_at += dt
            d_before = actor.d
            actor.step(t_rel, dt)
            if actor.d != d_before and self._touches_ego(actor):
                actor.d = d_before  # nobody walks or steers into the side of the ego: wait a step
        self.t += dt

    def _contact_limit(self) -> float:
        """Largest ego ``s`` [m] that keeps its front bumper 0.2 m short of every object in its path."""
        ep = self.episode
        d_e = ep.lane_centre(ep.ego_lane)
        front = self.s + self.vehicle.front_offset
        limit = math.inf
        for a in ep.actors:
            hs, hd = a.half_extents_sd()
            near = a.s - hs
            if abs(a.d - d_e) < hd + self.vehicle.width / 2 and near >= front - 0.5 and a.z0 < 1.5:
                limit = min(limit, near - 0.2 - self.vehicle.front_offset)
        return max(limit, self.s)

    def _touches_ego(self, a: Actor, margin: float = 0.3) -> bool:
        """Whether an actor's footprint overlaps the ego's (grown by ``margin`` [m])."""
        ep = self.episode
        hs, hd = a.half_extents_sd()
        front = self.s + self.vehicle.front_offset
        along = a.s + hs > front - self.vehicle.length - margin and a.s - hs < front + margin
        return along and abs(a.d - ep.lane_centre(ep.ego_lane)) < hd + self.vehicle.width / 2 + margin

    def advance(self, t: float) -> None:
        """Step the world to time ``t`` [s] (>= current time), starting new episodes on the way."""
        while self.t < t - 1e-12:
            end = self.episode.t_start + self.episode.duration
            if self.t >= end - 1e-12:
                self.episode = self._new_episode(self.t)
                continue
            self._step(min(MAX_STEP, t - self.t, end - self.t))

    # ----------------------------------------------------------------- snapshot
    def scene(self) -> Scene:
        """The world at the current time, in base_link and road terms."""
        ep = self.episode
        t_rel = self.t - ep.t_start
        d_e = ep.lane_centre(ep.ego_lane)
        road = RoadView(ep.kappa, ep.lane_width, ep.n_lanes, ep.ego_lane, d_e, self.s)
        acts = ep.actors
        n = len(acts)
        ds = np.array([a.s - self.s for a in acts])
        dd = np.array([a.d for a in acts])
        z = np.array([a.z0 + a.height / 2 for a in acts])
        centers = road.to_base(ds, dd, z) if n else np.zeros((0, 3))
        heading = ep.kappa * ds
        yaw = heading + np.array([a.yaw for a in acts])
        size = np.array([[a.length, a.width, a.height] for a in acts]).reshape(n, 3)
        vel_road = np.array([[a.vs, a.vd] for a in acts]).reshape(n, 2)
        ch, sh = np.cos(heading), np.sin(heading)
        # velocity over ground in base_link axes (ego frame is not inertial; this is the world velocity)
        vel = np.stack([ch * vel_road[:, 0] - sh * vel_road[:, 1], sh * vel_road[:, 0] + ch * vel_road[:, 1]],
                       axis=-1) if n else np.zeros((0, 2))
        signals = tuple(a.signal(t_rel) for a in acts)
        boxes = Boxes(centers, yaw, size, np.array([a.color for a in acts], dtype=np.uint8).reshape(n, 3),
                      np.array([REFLECTIVITY[a.material] for a in acts]), tuple(a.kind for a in acts), vel,
                      signals)
        lamps: list[Lamp] = []
        light_in: tuple[float, Light] | None = None
        stop_lines: list[float] = []
        front = self.s + self.vehicle.front_offset
        for light in ep.lights:
            st = light.state(t_rel)
            stop_lines.append(light.s_stop - self.s)
            gap = light.s_stop - front
            if gap >= 0.0 and (light_in is None or gap < light_in[0]):
                light_in = (gap, st)
            for hi in light.housings:
                h = acts[hi]
                hdg = ep.kappa * (h.s - self.s)
                normal = np.array([-math.cos(hdg), -math.sin(hdg), 0.0])
                face = road.to_base(np.array(h.s - self.s - h.length / 2 - 0.01), np.array(h.d), 0.0)
                for k, (colour, on) in enumerate((("red", Light.RED), ("yellow", Light.YELLOW),
                                                 ("green", Light.GREEN))):
                    c = face.copy()
                    c[2] = h.z0 + h.height / 2 + (1 - k) * LAMP_SPACING
                    lamps.append(Lamp(c, normal, colour, st == on))
        obstacles = []
        for a, sig in zip(acts, signals, strict=True):
            if a.kind in ("building",) or a.z0 > 2.0:  # overhead structures do not block the lane
                continue
            hs, hd = a.half_extents_sd()
            obstacles.append(Obstacle(gap=a.s - hs - front, lateral=a.d - d_e, half_width=hd, speed=a.vs,
                                      length=2 * hs, kind=a.kind, lamps=sig if self.lamp_cues else ""))
        lanes_left = ep.n_lanes - 1 - ep.ego_lane
        inp = ExpertInput(ego_speed=self.v, obstacles=tuple(obstacles), lane_width=ep.lane_width,
                          lanes_left=lanes_left, lanes_right=ep.ego_lane, light=light_in,
                          road_edges=(-ep.half_road - d_e, ep.half_road - d_e), vehicle=self.vehicle)
        return Scene(self.t, ep.scenario, ep.lighting, ep.camera_exposure, road, boxes, tuple(lamps),
                     tuple(stop_lines), tuple(c - self.s for c in ep.crosswalks), self.v, self.a,
                     (self.map_x, self.map_y, self.map_yaw), ep.kappa * self.v, inp, ep.noise_scale,
                     ep.lidar_dropout)


def static_scene(boxes: Sequence[dict[str, Any]] = (), *, lighting: str = "day", kappa: float = 0.0,
                 lane_width: float = 3.5, n_lanes: int = 3, ego_lane: int = 1, ego_speed: float = 0.0,
                 lamps: Sequence[Lamp] = (), light: tuple[float, Light] | None = None,
                 stop_lines: Sequence[float] = (), scenario: Scenario = Scenario.FREE_ROAD,
                 vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> Scene:
    """A hand-built scene (tests, figures). ``boxes``: dicts with ``center`` (x, y, z of the box
    centre in base_link [m]), ``size`` (l, w, h [m]) and optionally ``yaw`` [rad], ``color`` (RGB),
    ``kind`` (default "obstacle"), ``velocity`` (vx, vy [m/s]), ``signal`` (rear lamps). The expert
    input is derived on a straight road: gap = x - l/2 - ``vehicle.front_offset``, lateral = y."""
    n = len(boxes)
    center = np.array([b["center"] for b in boxes], float).reshape(n, 3)
    size = np.array([b["size"] for b in boxes], float).reshape(n, 3)
    yaw = np.array([b.get("yaw", 0.0) for b in boxes], float)
    kinds = tuple(str(b.get("kind", "obstacle")) for b in boxes)
    color = np.array([b.get("color", (200, 60, 40)) for b in boxes], dtype=np.uint8).reshape(n, 3)
    vel = np.array([b.get("velocity", (0.0, 0.0)) for b in boxes], float).reshape(n, 2)
    refl = np.array([REFLECTIVITY.get(k, REFLECTIVITY["obstacle"]) for k in kinds])
    d_e = (ego_lane - (n_lanes - 1) / 2.0) * lane_width
    road = RoadView(kappa, lane_width, n_lanes, ego_lane, d_e, 0.0)
    obstacles = tuple(
        Obstacle(gap=float(c[0] - sz[0] / 2 - vehicle.front_offset), lateral=float(c[1]), half_width=float(sz[1] / 2),
                 speed=float(v[0]), length=float(sz[0]), kind=k)
        for c, sz, v, k in zip(center, size, vel, kinds) if c[2] - sz[2] / 2 < 2.0)
    half = n_lanes * lane_width / 2
    inp = ExpertInput(ego_speed=ego_speed, obstacles=obstacles, lane_width=lane_width,
                      lanes_left=n_lanes - 1 - ego_lane, lanes_right=ego_lane, light=light,
                      road_edges=(-half - d_e, half - d_e), vehicle=vehicle)
    signal = tuple(str(b.get("signal", "")) for b in boxes)
    return Scene(0.0, scenario, LIGHTINGS[lighting], 1.0, road,
                 Boxes(center, yaw, size, color, refl, kinds, vel, signal),
                 tuple(lamps), tuple(stop_lines), (), ego_speed, 0.0, (0.0, 0.0, 0.0), 0.0, inp)


__all__ = ["LIGHTINGS", "Actor", "Boxes", "Episode", "Lamp", "Lighting", "RoadView", "Scene",
           "TrafficLight", "World", "road_to_base", "static_scene"]
