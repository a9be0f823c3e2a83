"""Output messages built from an :class:`~lmm_fusion.cycle.assessment.Assessment` (ROS-free).

Every builder takes a :class:`~lmm_fusion.io.msgtypes.MsgTypes` namespace, so the same function makes
rclpy messages for the node and rosbags messages for output bags. Fields are all given by keyword.
All outputs are in ``base_link``. Their ``header.stamp`` is :func:`data_stamp`: the stamp of the newest
sensor frame the cycle used (the cycle time when it used none), and each ``ModalityStatus.stamp`` is
that modality's frame stamp (zero when unused), so a consumer measures end-to-end latency as its
receive time minus the stamps. The cycle time itself is a used modality's ``stamp + age``.
"""

from __future__ import annotations

import array
import functools
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.rig import DEFAULT_VEHICLE, VehicleGeometry
from lmm_fusion.base.topics import BASE_FRAME
from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.io.common import make_header, make_time
from lmm_fusion.io.msgtypes import MsgTypes, typestore

# diagnostic_msgs/DiagnosticStatus levels
OK, WARN, ERROR, STALE = 0, 1, 2, 3

# visualization_msgs/Marker constants (identical in every ROS 2 distribution)
ARROW, CUBE, SPHERE, TEXT_VIEW_FACING = 0, 1, 2, 9
MARKER_ADD, MARKER_DELETE = 0, 2

RISK_COLOURS: dict[Risk, tuple[float, float, float]] = {
    Risk.LOW: (0.1, 0.8, 0.2), Risk.MEDIUM: (1.0, 0.7, 0.0), Risk.HIGH: (0.9, 0.1, 0.1)}


@functools.cache
def _extra_class(kind: str, ros_name: str) -> Any:
    """Message classes a Marker needs beyond :mod:`lmm_fusion.io.msgtypes`' list (Duration, ...)."""
    if kind == "rosbags":
        return typestore().types[ros_name]
    pkg, _, name = ros_name.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


def _cls(types: MsgTypes, ros_name: str) -> Any:
    cls = types.by_name.get(ros_name)
    return cls if cls is not None else _extra_class(types.kind, ros_name)


def _f32(types: MsgTypes, values: Any, n: int) -> Any:
    """A fixed-size float32[n] field value: numpy for both kinds (rclpy accepts it too)."""
    out = np.zeros(n, np.float32)
    v = np.asarray(values, np.float32).reshape(-1)[:n]
    out[: v.size] = v
    return out


def _i8_seq(types: MsgTypes, values: np.ndarray) -> Any:
    """An int8[] sequence field: ``array.array('b')`` for rclpy (its fast path), numpy for rosbags."""
    v = np.ascontiguousarray(values, dtype=np.int8).reshape(-1)
    return array.array("b", v.tobytes()) if types.kind == "rclpy" else v


def _f32_value(x: float) -> float:
    """Finite or +inf float (messages document +inf for "none"); NaN becomes +inf."""
    return float(x) if not math.isnan(x) else math.inf


def source_stamps(a: Assessment) -> dict[str, float]:
    """Stamp [s] of each modality's frame the cycle used (``cycle time - age``); unused ones are absent."""
    return {m.name: a.stamp - m.age for m in a.modalities if m.used and math.isfinite(m.age)}


def data_stamp(a: Assessment) -> float:
    """The outputs' ``header.stamp`` [s]: the newest frame the cycle used, else the cycle time."""
    stamps = source_stamps(a)
    return max(stamps.values()) if stamps else a.stamp


def modality_statuses(types: MsgTypes, a: Assessment) -> list[Any]:
    """One ModalityStatus per modality; ``stamp`` = its frame's stamp, zero when not used; ``reason``: why
    not used ("" when used)."""
    src = source_stamps(a)
    return [types.ModalityStatus(name=m.name, used=m.used, age=_f32_value(m.age), attention_share=float(m.attention),
                                 stamp=make_time(types, src.get(m.name, 0.0)),
                                 reason="" if m.used else (m.reason or "unknown"))
            for m in a.modalities]


def scene_assessment(types: MsgTypes, a: Assessment, frame_id: str = BASE_FRAME) -> Any:
    """lmm_fusion/msg/SceneAssessment of one cycle (``valid=False`` when no sensor was usable)."""
    return types.SceneAssessment(
        header=make_header(types, data_stamp(a), frame_id),
        risk_level=int(a.risk),
        risk_probabilities=_f32(types, a.risk_probs, 3),
        time_to_collision=_f32_value(a.ttc),
        nearest_obstacle_distance=_f32_value(a.distance),
        traffic_light_state=int(a.light),
        traffic_light_probabilities=_f32(types, a.light_probs, 4),
        modalities=modality_statuses(types, a),
        ego_speed=float(a.ego_speed) if a.ego_speed is not None else math.nan,
        ego_speed_source=a.ego_speed_source,
        degraded=a.degraded,
        valid=a.valid,
    )


def action_suggestion(types: MsgTypes, a: Assessment, frame_id: str = BASE_FRAME) -> Any:
    """lmm_fusion/msg/ActionSuggestion of one cycle (STOP at 0 m/s when invalid)."""
    return types.ActionSuggestion(
        header=make_header(types, data_stamp(a), frame_id),
        action=int(a.action),
        action_probabilities=_f32(types, a.action_probs, 6),
        target_speed=float(max(a.target_speed, 0.0)),
        confidence=float(min(max(a.confidence, 0.0), 1.0)),
        safety_override=bool(a.safety_override),
        rationale=a.rationale,
    )


def _pose(types: MsgTypes, x: float = 0.0, y: float = 0.0, z: float = 0.0, yaw: float = 0.0) -> Any:
    return types.Pose(position=types.Point(x=float(x), y=float(y), z=float(z)),
                      orientation=types.Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2)))


def occupancy_grid(types: MsgTypes, a: Assessment, grid: BevGrid = OCCUPANCY_GRID,
                   frame_id: str = BASE_FRAME) -> Any:
    """nav_msgs/OccupancyGrid of the predicted occupancy: 0..100 (probability × 100), -1 = unknown.

    The grid's (ny, nx) array is already in OccupancyGrid row-major layout (see :mod:`lmm_fusion.base.grid`).
    An invalid cycle or a grid of the wrong shape gives an all-unknown map.
    """
    if a.valid and a.occupancy is not None and a.occupancy.shape == grid.shape:
        data = np.rint(np.clip(np.nan_to_num(a.occupancy, nan=0.0), 0.0, 1.0) * 100).astype(np.int8)
    else:
        data = np.full(grid.shape, -1, np.int8)
    header = make_header(types, data_stamp(a), frame_id)
    info = types.MapMetaData(
        map_load_time=header.stamp, resolution=float(grid.cell),
        width=grid.nx, height=grid.ny, origin=_pose(types, grid.x_min, grid.y_min))
    return types.OccupancyGrid(header=header, info=info, data=_i8_seq(types, data))


def _marker(types: MsgTypes, a: Assessment, frame_id: str, ns: str, mid: int, mtype: int, *,
            pose: Any = None, scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
            rgba: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), text: str = "",
            points: Sequence[tuple[float, float, float]] = (), action: int = MARKER_ADD) -> Any:
    duration = _cls(types, "builtin_interfaces/msg/Duration")
    compressed = types.CompressedImage
    mesh_file = _cls(types, "visualization_msgs/msg/MeshFile")
    return types.Marker(
        header=make_header(types, data_stamp(a), frame_id), ns=ns, id=mid, type=mtype, action=action,
        pose=pose if pose is not None else _pose(types),
        scale=types.Vector3(x=float(scale[0]), y=float(scale[1]), z=float(scale[2])),
        color=types.ColorRGBA(r=float(rgba[0]), g=float(rgba[1]), b=float(rgba[2]), a=float(rgba[3])),
        # A lifetime of one second: markers vanish in RViz when the node stops publishing.
        lifetime=duration(sec=1, nanosec=0), frame_locked=False,
        points=[types.Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in points], colors=[],
        texture_resource="",
        texture=compressed(header=make_header(types, 0.0, ""), format="", data=_u8_empty(types)),
        uv_coordinates=[], text=text, mesh_resource="",
        mesh_file=mesh_file(filename="", data=_u8_empty(types)), mesh_use_embedded_materials=False,
    )


def _u8_empty(types: MsgTypes) -> Any:
    return array.array("B") if types.kind == "rclpy" else np.zeros(0, np.uint8)


def _path_points(a: Assessment, vehicle: VehicleGeometry = DEFAULT_VEHICLE,
                 horizon_s: float = 3.0) -> list[tuple[float, float, float]]:
    """Suggested path in base_link from the front bumper: straight ahead, shifted one lane (3.5 m) for a
    lane change, ending at the stopping point (or the obstacle margin) when stopping; length ≈ target
    speed × horizon."""
    start = vehicle.front_offset
    length = max(a.target_speed * horizon_s, 2.0)
    if a.action == Action.STOP:
        length = 0.5 if not math.isfinite(a.distance) else max(min(a.distance * 0.8, 5.0), 0.5)
    if math.isfinite(a.distance) and a.action not in (Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT):
        length = min(length, max(a.distance - 1.0, 0.5))
    lateral = {Action.CHANGE_LANE_LEFT: 3.5, Action.CHANGE_LANE_RIGHT: -3.5}.get(a.action, 0.0)
    return [(start, 0.0, 0.3), (start + length, lateral, 0.3)]


def markers(types: MsgTypes, a: Assessment, frame_id: str = BASE_FRAME,
            vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> Any:
    """visualization_msgs/MarkerArray: risk text, action text, the ego footprint, suggested-path arrow
    (from the front bumper), nearest obstacle (its distance counted from the bumper), and one bar per
    modality (height = attention share, grey when masked). Stable ns/ids, so each cycle replaces the
    previous one; the obstacle marker is deleted when the lane is free. ``vehicle``: the footprint and
    bumper position in ``base_link`` (the node's ``vehicle.*`` parameters)."""
    rgb = RISK_COLOURS[a.risk] if a.valid else (0.6, 0.6, 0.6)
    out = []
    risk_text = f"risk {a.risk.name.lower()}" if a.valid else "no assessment"
    if a.valid and a.degraded:
        risk_text += f" (degraded: {', '.join(a.masked_names())} masked)"
    out.append(_marker(types, a, frame_id, "risk", 0, TEXT_VIEW_FACING, pose=_pose(types, 0.0, 0.0, 3.5),
                       scale=(0.0, 0.0, 0.8), rgba=(*rgb, 1.0), text=risk_text))
    action_text = f"{a.action.name.lower()} {a.target_speed:.1f} m/s" + (" [override]" if a.safety_override else "")
    out.append(_marker(types, a, frame_id, "action", 0, TEXT_VIEW_FACING, pose=_pose(types, 0.0, 0.0, 2.6),
                       scale=(0.0, 0.0, 0.6), rgba=(1.0, 1.0, 1.0, 1.0), text=f"{action_text}\n{a.rationale}"))
    out.append(_marker(types, a, frame_id, "ego", 0, CUBE,
                       pose=_pose(types, vehicle.front_offset - vehicle.length / 2, 0.0, 0.75),
                       scale=(vehicle.length, vehicle.width, 1.5), rgba=(0.8, 0.8, 0.8, 0.3)))
    out.append(_marker(types, a, frame_id, "path", 0, ARROW, scale=(0.4, 0.8, 0.8), rgba=(*rgb, 0.9),
                       points=_path_points(a, vehicle), action=MARKER_ADD if a.valid else MARKER_DELETE))
    has_obstacle = a.valid and math.isfinite(a.distance)
    ox = vehicle.front_offset + (a.distance if has_obstacle else 0.0)
    out.append(_marker(types, a, frame_id, "nearest_obstacle", 0, CUBE, pose=_pose(types, ox + 0.25, 0.0, 0.75),
                       scale=(0.5, 2.0, 1.5), rgba=(1.0, 0.2, 0.2, 0.6),
                       action=MARKER_ADD if has_obstacle else MARKER_DELETE))
    for i, m in enumerate(a.modalities):
        h = max(float(m.attention), 0.02) * 3.0
        colour = (0.2, 0.6, 1.0, 0.9) if m.used else (0.5, 0.5, 0.5, 0.5)
        out.append(_marker(types, a, frame_id, "modality_attention", i, CUBE,
                           pose=_pose(types, -2.0, 2.0 - 1.0 * i, h / 2), scale=(0.6, 0.6, h), rgba=colour))
        label = f"{m.name} {m.attention:.2f}" if m.used else f"{m.name} masked"
        out.append(_marker(types, a, frame_id, "modality_label", i, TEXT_VIEW_FACING,
                           pose=_pose(types, -2.0, 2.0 - 1.0 * i, h + 0.4), scale=(0.0, 0.0, 0.35),
                           rgba=(1.0, 1.0, 1.0, 1.0), text=label))
    return types.MarkerArray(markers=out)


@dataclass(frozen=True)
class StatusItem:
    """One diagnostic status, ROS-free: ``level`` is OK/WARN/ERROR/STALE (0..3)."""

    name: str
    level: int
    message: str
    hardware_id: str = ""
    values: dict[str, str] = field(default_factory=dict)


def diagnostic_array(types: MsgTypes, stamp: float, statuses: Sequence[StatusItem]) -> Any:
    """diagnostic_msgs/DiagnosticArray; ``level`` is a byte in rclpy and an int in rosbags."""
    items = []
    for s in statuses:
        level = bytes([s.level]) if types.kind == "rclpy" else int(s.level)
        items.append(types.DiagnosticStatus(
            level=level, name=s.name, message=s.message, hardware_id=s.hardware_id,
            values=[types.KeyValue(key=k, value=str(v)) for k, v in s.values.items()]))
    return types.DiagnosticArray(header=make_header(types, stamp, ""), status=items)


def level_of(status: Any) -> int:
    """Integer level of a DiagnosticStatus from either kind (bytes in rclpy, int in rosbags)."""
    lv = status.level
    return lv[0] if isinstance(lv, (bytes, bytearray)) else int(lv)


__all__ = ["ERROR", "OK", "STALE", "WARN", "StatusItem", "action_suggestion", "data_stamp", "diagnostic_array",
           "level_of", "markers", "modality_statuses", "occupancy_grid", "scene_assessment", "source_stamps"]
