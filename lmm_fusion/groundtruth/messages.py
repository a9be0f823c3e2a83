"""Ground-truth messages in and out: the ``/ground_truth/*`` topics of a drive.

* Out: :func:`ground_truth_msgs` writes the five messages of one LiDAR frame from the expert's
  :class:`~lmm_fusion.groundtruth.expert.Label` and a scene (the synthetic world's, or a CARLA snapshot
  seen the same way), so synthetic and CARLA bags carry the same layout.
* In: :func:`ground_truth_from_messages` turns the latest messages of a cycle into a
  :class:`GroundTruth` (numpy, enums, floats); :func:`occupancy_from_msg` decodes the occupancy grid.

Occupancy convention (one for every reader): the message holds 0..100 per cell (-1 unknown); decoded it
is a value in [0, 1] (unknown = 0), and a cell is *occupied* when that value is at least
:data:`OCCUPIED_FROM` (50 in the message). The writer only ever puts 0 or 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.vocabulary import MODALITIES, Action, Light, Risk, Scenario
from lmm_fusion.groundtruth.expert import Label, occupancy
from lmm_fusion.io.common import make_header, make_time, stamp_to_sec
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.msgtypes import MsgTypes

#: Decoded occupancy value (message value / 100) from which a ground-truth cell counts as occupied.
OCCUPIED_FROM = 0.5
#: Boxes whose bottom lies below this height [m] in ``base_link`` are on the ground: they occupy cells.
GROUND_BOX_MAX_BOTTOM = 2.0


# ------------------------------------------------------------------------------------------------ in
@dataclass(frozen=True)
class GroundTruth:
    """Labels of one LiDAR frame. ``stamp`` [s]; any field may be None when its topic is absent.

    ``occupancy``: (ny, nx) float32 in [0, 1] (1 = occupied) on the grid of the message, or None;
    :attr:`occupied` is its cells at or above :data:`OCCUPIED_FROM`.
    ``ego_speed``: true forward speed [m/s] from the odometry twist.
    """

    stamp: float
    risk: Risk | None = None
    ttc: float | None = None
    distance: float | None = None
    light: Light | None = None
    action: Action | None = None
    target_speed: float | None = None
    occupancy: np.ndarray | None = None
    scenario: str | None = None
    ego_speed: float | None = None

    @property
    def occupied(self) -> np.ndarray | None:
        """(ny, nx) bool, True = occupied cell (see the module docstring), or None without occupancy."""
        return None if self.occupancy is None else self.occupancy >= OCCUPIED_FROM


def _finite_or_inf(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else math.inf


def occupancy_from_msg(msg: Any, grid: BevGrid = OCCUPANCY_GRID) -> np.ndarray:
    """nav_msgs/OccupancyGrid (0..100, -1 unknown) -> (ny, nx) float32 in [0, 1] (unknown = 0).

    Raises :class:`MessageError` when ``info.width``/``info.height`` disagree with ``grid`` or with the
    length of ``data`` (sizes are checked before any reshape).
    """
    w, h = int(msg.info.width), int(msg.info.height)
    if (h, w) != grid.shape:
        raise MessageError(
            f"occupancy.info: width x height {w}x{h} differs from the grid {grid.nx}x{grid.ny}"
        )
    data = np.asarray(msg.data, dtype=np.int8).reshape(-1)
    if data.size != w * h:
        raise MessageError(f"occupancy.data: {data.size} cells, expected width*height = {w * h}")
    return np.clip(data.astype(np.float32), 0.0, 100.0).reshape(h, w) / 100.0


def ground_truth_from_messages(
    latest: Mapping[str, tuple[float, Any]], grid: BevGrid = OCCUPANCY_GRID
) -> GroundTruth | None:
    """``{topic: (bag time [s], msg)}`` of ``/ground_truth/*`` -> :class:`GroundTruth` (None if empty).

    The stamp is that of the scene assessment label when present, else the newest of the others.
    TTC and distance that are not finite ("none", "free") become +inf.
    """
    if not latest:
        return None
    fields: dict[str, Any] = {}
    stamp = max(t for t, _ in latest.values())
    if T.GT_SCENE in latest:
        _, m = latest[T.GT_SCENE]
        stamp = stamp_to_sec(m.header.stamp)
        fields.update(
            risk=Risk(int(m.risk_level)),
            light=Light(int(m.traffic_light_state)),
            ttc=_finite_or_inf(m.time_to_collision),
            distance=_finite_or_inf(m.nearest_obstacle_distance),
        )
    if T.GT_ACTION in latest:
        _, m = latest[T.GT_ACTION]
        fields.update(action=Action(int(m.action)), target_speed=float(m.target_speed))
    if T.GT_OCCUPANCY in latest:
        fields["occupancy"] = occupancy_from_msg(latest[T.GT_OCCUPANCY][1], grid)
    if T.GT_SCENARIO in latest:
        fields["scenario"] = str(latest[T.GT_SCENARIO][1].data)
    if T.GT_EGO in latest:
        v = latest[T.GT_EGO][1].twist.twist.linear
        fields["ego_speed"] = float(math.hypot(v.x, v.y))
    return GroundTruth(stamp=stamp, **fields)


# ----------------------------------------------------------------------------------------------- out
class TruthBoxes(Protocol):
    """What the writer reads of a scene's boxes: ``center`` (N, 3) and ``size`` (N, 3) length, width,
    height [m] and ``yaw`` (N,) [rad], all in ``base_link``."""

    @property
    def center(self) -> np.ndarray: ...

    @property
    def yaw(self) -> np.ndarray: ...

    @property
    def size(self) -> np.ndarray: ...

    def __len__(self) -> int: ...


class TruthScene(Protocol):
    """What the writer reads of a scene (:class:`lmm_fusion.synth.world.Scene`, or a CARLA snapshot
    seen the same way): boxes, ego pose (x, y [m], yaw [rad]) in ``map``, forward speed [m/s], yaw
    rate [rad/s] and the scenario family."""

    @property
    def boxes(self) -> TruthBoxes: ...

    @property
    def ego_pose(self) -> tuple[float, float, float]: ...

    @property
    def ego_speed(self) -> float: ...

    @property
    def ego_yaw_rate(self) -> float: ...

    @property
    def scenario(self) -> Scenario: ...


def _one_hot(n: int, i: int) -> np.ndarray:
    v = np.zeros(n, dtype=np.float32)
    v[int(i)] = 1.0
    return v


def ground_truth_msgs(types: MsgTypes, scene: TruthScene, label: Label, stamp: float,
                      ages: Sequence[float] = (0.0, 0.0, 0.0)) -> dict[str, Any]:
    """Ground-truth messages for one LiDAR frame stamped ``stamp`` [s], keyed by topic.

    ``ages`` [s]: age of each modality's latest frame (MODALITIES order) written into the scene label.
    The occupancy grid rasterises the footprints of the boxes on the ground
    (:func:`lmm_fusion.groundtruth.expert.occupancy`: 100 / 0).
    """
    hdr = make_header(types, stamp, T.BASE_FRAME)
    mods = [types.ModalityStatus(name=n, used=True, age=float(a), attention_share=float(1.0 / 3.0),
                                 stamp=make_time(types, stamp - float(a) if math.isfinite(a) else 0.0), reason="")
            for n, a in zip(MODALITIES, ages)]
    sa = types.SceneAssessment(
        header=hdr, risk_level=int(label.risk), risk_probabilities=_one_hot(3, label.risk),
        time_to_collision=float(label.ttc), nearest_obstacle_distance=float(label.distance),
        traffic_light_state=int(label.light), traffic_light_probabilities=_one_hot(4, label.light),
        modalities=mods, ego_speed=float(scene.ego_speed), ego_speed_source="ground_truth", degraded=False,
        valid=True)
    act = types.ActionSuggestion(
        header=hdr, action=int(label.action), action_probabilities=_one_hot(6, label.action),
        target_speed=float(label.target_speed), confidence=1.0, safety_override=False, rationale=label.rationale)
    b = scene.boxes
    ground = (b.center[:, 2] - b.size[:, 2] / 2) < GROUND_BOX_MAX_BOTTOM if len(b) else np.zeros(0, bool)
    occ = occupancy(b.center[ground, :2], b.yaw[ground], b.size[ground, :2], OCCUPANCY_GRID)
    g = OCCUPANCY_GRID
    grid = types.OccupancyGrid(
        header=hdr,
        info=types.MapMetaData(
            map_load_time=make_time(types, stamp), resolution=float(g.cell), width=g.nx, height=g.ny,
            origin=types.Pose(position=types.Point(x=float(g.x_min), y=float(g.y_min), z=0.0),
                              orientation=types.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0))),
        data=occ.reshape(-1).astype(np.int8))
    x, y, yaw = scene.ego_pose
    odom = types.Odometry(
        header=make_header(types, stamp, T.MAP_FRAME), child_frame_id=T.BASE_FRAME,
        pose=types.PoseWithCovariance(
            pose=types.Pose(position=types.Point(x=float(x), y=float(y), z=0.0),
                            orientation=types.Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))),
            covariance=np.zeros(36)),
        twist=types.TwistWithCovariance(
            twist=types.Twist(linear=types.Vector3(x=float(scene.ego_speed), y=0.0, z=0.0),
                              angular=types.Vector3(x=0.0, y=0.0, z=float(scene.ego_yaw_rate))),
            covariance=np.zeros(36)))
    return {T.GT_SCENE: sa, T.GT_ACTION: act, T.GT_OCCUPANCY: grid,
            T.GT_SCENARIO: types.String(data=scene.scenario.name), T.GT_EGO: odom}


__all__ = [
    "OCCUPIED_FROM",
    "GroundTruth",
    "TruthBoxes",
    "TruthScene",
    "ground_truth_from_messages",
    "ground_truth_msgs",
    "occupancy_from_msg",
]
