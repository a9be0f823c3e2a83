"""Recording a CARLA drive as a rosbag2 in the synthetic world's layout, with ground truth.

Pure parts (no ``carla`` import, tested without a server):

* :class:`TickAssembler` matches sensor frames by CARLA frame number, keeps the frames due at the
  rig rates, drops incomplete ticks and counts everything it drops;
* :class:`Actor` / :class:`EgoTruth` are plain snapshots of the world (the bridge fills them from
  ``world.get_actors()``), already in REP-103 ``map`` coordinates (ENU: CARLA ``(x, -y, z)``, yaw
  negated, radians);
* :func:`footprints_in_base` puts actor boxes into ``base_link`` and :func:`ground_truth` turns one
  world snapshot into labels with the synthetic world's rule-based expert
  (:func:`lmm_fusion.groundtruth.expert.assess` and :func:`lmm_fusion.groundtruth.expert.occupancy`), so the rules
  and the footprint rasterisation exist once;
* :class:`CarlaRecorder` writes sensor messages and ground truth through
  :class:`lmm_fusion.io.bags.BagWriter` on the topics of :mod:`lmm_fusion.base.topics`.

Ground truth is stamped like the LiDAR frame it labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig, VehicleGeometry
from lmm_fusion.base.vocabulary import Light, Scenario
from lmm_fusion.groundtruth.expert import DETECT_RANGE, ExpertInput, Label, Obstacle, assess, in_ego_corridor, occupancy
from lmm_fusion.groundtruth.messages import ground_truth_msgs
from lmm_fusion.io.bags import BagWriter
from lmm_fusion.io.msgtypes import rosbags_types
from lmm_fusion.io.tf import tf_static_msg

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ tick assembly
@dataclass(frozen=True)
class Tick:
    """The frames of one simulation tick: CARLA ``frame`` number and ``data`` per sensor name."""

    frame: int
    data: dict[str, Any]


@dataclass
class TickCounters:
    """What the assembler did: ``complete`` ticks handed out, ``incomplete`` ticks dropped (a due
    sensor never delivered), ``skipped`` frames not due at the rig rate, ``late`` frames for a tick
    already handed out or dropped, ``duplicate`` second frames of a sensor on one tick, ``unknown``
    frames of sensors not configured."""

    complete: int = 0
    incomplete: int = 0
    skipped: int = 0
    late: int = 0
    duplicate: int = 0
    unknown: int = 0
    missing: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"complete": self.complete, "incomplete": self.incomplete, "skipped": self.skipped,
                "late": self.late, "duplicate": self.duplicate, "unknown": self.unknown,
                "missing": dict(self.missing)}


class TickAssembler:
    """Group sensor frames by CARLA frame number.

    ``periods`` maps sensor name -> ticks between kept frames (1 = every tick; see
    :func:`lmm_fusion.carla.convert.sensor_periods`); a sensor is *due* on frame ``f`` when
    ``(f - start_frame) % period == 0``. Frames before ``start_frame`` or not due are skipped. A tick
    is complete when every due sensor delivered; :meth:`expire` drops older pending ticks as
    incomplete. At most ``max_pending`` ticks are held (the oldest is dropped first), so a sensor that
    stops delivering cannot grow memory.

    Not thread-safe: the bridge's sensor callbacks put frames on a queue and one thread adds them.
    """

    def __init__(self, periods: Mapping[str, int], start_frame: int, max_pending: int = 16) -> None:
        for name, p in periods.items():
            if isinstance(p, bool) or not isinstance(p, int) or p < 1:
                raise ValueError(f"periods[{name!r}]: expected an integer >= 1, got {p!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending: expected >= 1, got {max_pending!r}")
        self.periods = dict(periods)
        self.start_frame = int(start_frame)
        self.max_pending = max_pending
        self.counters = TickCounters(missing=dict.fromkeys(self.periods, 0))
        self._pending: dict[int, dict[str, Any]] = {}
        self._done_before = self.start_frame  # frames < this were handed out or dropped
        # Frames >= _done_before already handed out or dropped (a later tick may complete before
        # an earlier one is expired).
        self._closed: set[int] = set()

    def due(self, frame: int) -> tuple[str, ...]:
        """Sensors whose frame is kept on ``frame`` (empty before ``start_frame``)."""
        if frame < self.start_frame:
            return ()
        return tuple(s for s, p in self.periods.items() if (frame - self.start_frame) % p == 0)

    def add(self, sensor: str, frame: int, data: Any) -> bool:
        """Offer one sensor frame; True when it was kept for its tick."""
        c = self.counters
        if sensor not in self.periods:
            c.unknown += 1
            return False
        if sensor not in self.due(frame):
            c.skipped += 1
            return False
        if frame < self._done_before or frame in self._closed:
            c.late += 1
            return False
        slot = self._pending.setdefault(frame, {})
        if sensor in slot:
            c.duplicate += 1
            return False
        slot[sensor] = data
        while len(self._pending) > self.max_pending:
            self._drop(min(self._pending))
        return True

    def complete(self, frame: int) -> Tick | None:
        """The tick of ``frame`` when every due sensor delivered (removed from the pending set)."""
        due = self.due(frame)
        slot = self._pending.get(frame)
        if not due or slot is None or any(s not in slot for s in due):
            return None
        del self._pending[frame]
        self._closed.add(frame)
        self.counters.complete += 1
        return Tick(frame, slot)

    def expire(self, before_frame: int) -> int:
        """Drop every pending tick with frame < ``before_frame`` as incomplete; returns how many.

        Ticks on which some sensor was due but none delivered are counted too (they were never
        pending), so a silent sensor shows up in the counters.
        """
        dropped = 0
        for f in range(self._done_before, before_frame):
            if f in self._closed:
                continue
            if f in self._pending:
                self._drop(f)
                dropped += 1
            elif self.due(f):
                self.counters.incomplete += 1
                for s in self.due(f):
                    self.counters.missing[s] += 1
                dropped += 1
        self._done_before = max(self._done_before, before_frame)
        self._closed = {f for f in self._closed if f >= self._done_before}
        return dropped

    def _drop(self, frame: int) -> None:
        slot = self._pending.pop(frame)
        self.counters.incomplete += 1
        for s in self.due(frame):
            if s not in slot:
                self.counters.missing[s] += 1
        self._closed.add(frame)
        log.debug("tick %d dropped incomplete (have %s, due %s)", frame, sorted(slot), self.due(frame))

    def received(self, frame: int) -> list[str]:
        """Sensors that delivered for the pending tick of ``frame`` (empty if none or not pending)."""
        return sorted(self._pending.get(frame, {}))

    @property
    def pending(self) -> list[int]:
        """Frame numbers of ticks still waiting for a sensor."""
        return sorted(self._pending)


# ------------------------------------------------------------------------------------ world snapshot
@dataclass(frozen=True)
class Actor:
    """One actor of the world in the ENU ``map`` frame: box centre ``x, y`` [m], heading ``yaw``
    [rad, 0 = east], box ``length``/``width``/``height`` [m], velocity ``vx, vy`` [m/s], ``kind``
    (``vehicle``, ``pedestrian``, ``obstacle``), CARLA ``id``."""

    id: int
    kind: str
    x: float
    y: float
    yaw: float
    length: float
    width: float
    vx: float = 0.0
    vy: float = 0.0
    height: float = 1.5


@dataclass(frozen=True)
class EgoTruth:
    """The ego's true state: ``base_link`` pose in ``map`` (x, y, z [m], yaw [rad]), velocity in
    ``map`` (vx, vy [m/s]), ego lane centre line ``lane_path`` (N, 2) in ``base_link`` (driving order,
    from the map's waypoints), ``lane_width`` [m], neighbouring same-direction lanes
    ``lanes_left``/``lanes_right`` (0 or more), ``light`` (stop-line distance from the front bumper
    [m], state) of the light governing the ego lane, or None; ``yaw_rate`` [rad/s, + = left]."""

    x: float
    y: float
    z: float
    yaw: float
    vx: float
    vy: float
    lane_path: np.ndarray
    lane_width: float = 3.5
    lanes_left: int = 0
    lanes_right: int = 0
    light: tuple[float, Light] | None = None
    yaw_rate: float = 0.0

    @property
    def speed(self) -> float:
        return math.hypot(self.vx, self.vy)


def to_base(ego: EgoTruth, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map (ENU) coordinates -> ``base_link`` x, y (metres)."""
    c, s = math.cos(ego.yaw), math.sin(ego.yaw)
    dx, dy = np.asarray(x, np.float64) - ego.x, np.asarray(y, np.float64) - ego.y
    return c * dx + s * dy, -s * dx + c * dy


def footprints_in_base(ego: EgoTruth, actors: Iterable[Actor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actor boxes in ``base_link``: centres (N, 2) [m], yaws (N,) [rad], sizes (N, 2) length/width [m]
    (the arguments of :func:`lmm_fusion.groundtruth.expert.occupancy`)."""
    acts = list(actors)
    if not acts:
        return np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
    bx, by = to_base(ego, np.array([a.x for a in acts]), np.array([a.y for a in acts]))
    yaws = np.array([math.remainder(a.yaw - ego.yaw, math.tau) for a in acts])
    sizes = np.array([(a.length, a.width) for a in acts], np.float64)
    return np.stack([bx, by], axis=1), yaws, sizes


def project_to_path(points_xy: np.ndarray, path_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frenet coordinates of points along a polyline (both in ``base_link``, metres).

    Returns ``s`` (N,) arc length from the projection of ``base_link``'s origin (so the ego is at
    s = 0), ``d`` (N,) signed lateral offset (+ = left of the path) and the unit tangent (N, 2) at each
    projection. A path with fewer than 2 points is taken as the x axis.
    """
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    path = np.asarray(path_xy, np.float64).reshape(-1, 2)
    if len(path) < 2:
        path = np.array([[-1.0, 0.0], [1.0, 0.0]])
    seg = path[1:] - path[:-1]
    seg_len = np.maximum(np.hypot(seg[:, 0], seg[:, 1]), 1e-9)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])

    def project(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rel = q[:, None, :] - path[None, :-1, :]  # (N, M-1, 2)
        t = (rel * seg[None]).sum(-1) / seg_len[None] ** 2
        # The first and last segments extend past their ends so points beyond the path still project.
        lo, hi = np.zeros(len(seg)), np.ones(len(seg))
        lo[0], hi[-1] = -np.inf, np.inf
        t_clip = np.clip(t, lo, hi)
        foot = path[None, :-1, :] + t_clip[..., None] * seg[None]
        dist = np.hypot(*(q[:, None, :] - foot).transpose(2, 0, 1))
        k = np.argmin(dist, axis=1)
        i = np.arange(len(q))
        tangent = seg[k] / seg_len[k, None]
        s = cum[k] + t_clip[i, k] * seg_len[k]
        off = q - foot[i, k]
        d = tangent[:, 0] * off[:, 1] - tangent[:, 1] * off[:, 0]
        return s, d, tangent

    s0, _, _ = project(np.zeros((1, 2)))
    if len(pts) == 0:
        return np.zeros(0), np.zeros(0), np.zeros((0, 2))
    s, d, tangent = project(pts)
    return s - s0[0], d, tangent


def actor_kind(type_id: str) -> str:
    """CARLA blueprint id (``vehicle.tesla.model3``, ``walker.pedestrian.0001``, ...) -> expert kind."""
    if type_id.startswith("vehicle."):
        return "vehicle"
    return "pedestrian" if type_id.startswith("walker.") else "obstacle"


def expert_input(ego: EgoTruth, actors: Iterable[Actor], vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> ExpertInput:
    """World snapshot -> the expert's road-frame view (:class:`lmm_fusion.groundtruth.expert.ExpertInput`).

    Gaps and lateral offsets are measured along the ego lane's centre line (Frenet coordinates on
    ``ego.lane_path``), so curved roads are handled; lateral offsets are relative to the lane centre.
    """
    acts = list(actors)
    obstacles: list[Obstacle] = []
    if acts:
        centres, yaws, sizes = footprints_in_base(ego, acts)
        s, d, tangent = project_to_path(centres, ego.lane_path)
        c, sn = math.cos(ego.yaw), math.sin(ego.yaw)
        for i, a in enumerate(acts):
            ln, wd = sizes[i]
            rel = math.remainder(yaws[i] - math.atan2(tangent[i, 1], tangent[i, 0]), math.tau)
            along = abs(ln * math.cos(rel)) + abs(wd * math.sin(rel))  # box extent along the road
            across = abs(ln * math.sin(rel)) + abs(wd * math.cos(rel))
            vbx, vby = c * a.vx + sn * a.vy, -sn * a.vx + c * a.vy  # velocity in base_link
            speed_along = vbx * tangent[i, 0] + vby * tangent[i, 1]
            gap = s[i] - along / 2.0 - vehicle.front_offset
            obstacles.append(Obstacle(gap=float(gap), lateral=float(d[i]), half_width=float(across / 2.0),
                                      speed=float(speed_along), length=float(along), kind=a.kind))
    w = ego.lane_width
    edges = (-(w / 2.0 + ego.lanes_right * w), w / 2.0 + ego.lanes_left * w)
    return ExpertInput(ego_speed=ego.speed, obstacles=tuple(obstacles), lane_width=w, lanes_left=ego.lanes_left,
                       lanes_right=ego.lanes_right, light=ego.light, road_edges=edges, vehicle=vehicle)


def scenario_of(label: Label, inp: ExpertInput) -> Scenario:
    """Scenario family a CARLA frame belongs to (CARLA drives are not scripted per family, so it is
    read off the expert's view): light > pedestrian > stopped obstacle > lead vehicle > free road."""
    if label.light in (Light.RED, Light.YELLOW):
        return Scenario.TRAFFIC_LIGHT
    # The expert's lead: the nearest object in the ego corridor ahead (same filter as expert.assess).
    ahead = [o for o in inp.obstacles
             if in_ego_corridor(o, inp.vehicle) and o.gap + o.length > 0.0 and o.gap < DETECT_RANGE]
    lead = min(ahead, key=lambda o: o.gap) if ahead else None
    if lead is None:
        return Scenario.FREE_ROAD
    if lead.kind == "pedestrian":
        return Scenario.PEDESTRIAN_CROSSING
    if lead.speed < 0.5:
        return (Scenario.STOPPED_OBSTACLE_FREE_LEFT if label.free_left or label.free_right
                else Scenario.STOPPED_OBSTACLE_BLOCKED)
    return Scenario.LEAD_VEHICLE


@dataclass(frozen=True)
class GroundTruth:
    """Labels of one frame: the expert's :class:`Label`, the occupancy (ny, nx) int8 (100 / 0) and
    the scenario family."""

    label: Label
    occupancy: np.ndarray
    scenario: Scenario


def ground_truth(ego: EgoTruth, actors: Iterable[Actor], grid: BevGrid = OCCUPANCY_GRID,
                 vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> GroundTruth:
    """Expert labels + occupancy for one world snapshot (the ego itself must not be in ``actors``);
    ``vehicle``: the ego's footprint (gaps from its bumper)."""
    acts = list(actors)
    inp = expert_input(ego, acts, vehicle)
    label = assess(inp)
    centres, yaws, sizes = footprints_in_base(ego, acts)
    occ = occupancy(centres, yaws, sizes, grid)
    return GroundTruth(label, occ, scenario_of(label, inp))


# ------------------------------------------------------------------------------------------- recorder
@dataclass(frozen=True)
class _Boxes:
    """The boxes the ground-truth writer reads (:class:`lmm_fusion.groundtruth.messages.TruthBoxes`)."""

    center: np.ndarray  # (N, 3) base_link [m]
    yaw: np.ndarray  # (N,) [rad]
    size: np.ndarray  # (N, 3) length, width, height [m]
    kind: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.kind)


@dataclass(frozen=True)
class _SceneView:
    """The scene the ground-truth writer reads (:class:`lmm_fusion.groundtruth.messages.TruthScene`,
    as :func:`lmm_fusion.groundtruth.messages.ground_truth_msgs` reads it of the synthetic world),
    filled from a CARLA snapshot."""

    boxes: _Boxes
    ego_pose: tuple[float, float, float]
    ego_speed: float
    ego_yaw_rate: float
    scenario: Scenario


def scene_view(ego: EgoTruth, actors: Iterable[Actor], scenario: Scenario) -> _SceneView:
    """A CARLA snapshot in the synthetic world's scene terms (boxes in ``base_link`` on the ground,
    ego pose in ``map``, forward speed [m/s], yaw rate [rad/s])."""
    acts = list(actors)
    centres, yaws, sizes = footprints_in_base(ego, acts)
    heights = np.array([a.height for a in acts], np.float64)
    centre3 = np.concatenate([centres, heights[:, None] / 2.0], axis=1) if acts else np.zeros((0, 3))
    size3 = np.concatenate([sizes, heights[:, None]], axis=1) if acts else np.zeros((0, 3))
    forward = math.cos(ego.yaw) * ego.vx + math.sin(ego.yaw) * ego.vy
    return _SceneView(_Boxes(centre3, yaws, size3, tuple(a.kind for a in acts)), (ego.x, ego.y, ego.yaw),
                      forward, ego.yaw_rate, scenario)


class CarlaRecorder:
    """Write a CARLA drive as a rosbag2 (sensor topics + ground truth) in the synthetic world's layout.

    The static transforms and the five ground-truth messages are built by the writers the synthetic
    world uses too (:func:`lmm_fusion.io.tf.tf_static_msg`, :func:`lmm_fusion.groundtruth.messages.ground_truth_msgs`),
    so a CARLA bag and a synthetic bag differ only in content. Use as a context manager; stamps are
    sim time [s].
    """

    def __init__(self, path: Path | str, rig: SensorRig, storage: str = "mcap") -> None:
        self.rig = rig
        self.types = rosbags_types()
        self.writer = BagWriter(path, storage)
        self._static_written = False

    def __enter__(self) -> CarlaRecorder:
        self.writer.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.writer.counts)

    def write_static(self, stamp: float) -> None:
        """``/tf_static`` with the rig's extrinsics (once)."""
        if not self._static_written:
            self.writer.write(topics.TF_STATIC, stamp, tf_static_msg(self.types, self.rig, stamp))
            self._static_written = True

    def write_message(self, topic: str, stamp: float, msg: Any) -> None:
        self.writer.write(topic, stamp, msg)

    def write_truth(self, stamp: float, gt: GroundTruth, ego: EgoTruth, actors: Iterable[Actor]) -> None:
        """The five ground-truth topics for the LiDAR frame stamped ``stamp`` [s]."""
        view = scene_view(ego, actors, gt.scenario)
        for topic, msg in ground_truth_msgs(self.types, view, gt.label, stamp).items():
            self.writer.write(topic, stamp, msg)
