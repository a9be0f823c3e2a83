"""Ceiling study: how well can *any* model do, given what the sensors and the model's inputs show?

The expert (:mod:`lmm_fusion.groundtruth.expert`) labels each LiDAR frame from the true scene. This
module re-applies the same rules to cut-down versions of that scene and compares each with the label:

* ``truth``: the scene as the expert sees it (must reproduce the recorded label; checked per frame);
* ``grid``: only objects whose footprint reaches the model's BEV input grid (``INPUT_GRID``,
  x -8..56 m, y -16..16 m in ``base_link``);
* ``lidar``: of those, only objects hit by at least :data:`MIN_LIDAR_POINTS` points of the recorded
  cloud (occlusion, dropouts, beam spacing);
* ``sensors``: the ``lidar`` objects plus those the camera frame of the cycle shows (pinhole FOV,
  range :data:`CAMERA_RANGE`); lamps, turn signals and the traffic light only where the camera shows
  them, in the state at the camera frame's stamp (its latency);
* ``noisy``: ``sensors`` with the ego speed the GNSS estimator of the pipeline reports and each
  object's speed as a model with two BEV frames could measure it: ego speed plus the change of the
  object's gap, quantised to the BEV cell, over the history lag; ``noisy_true_ego`` the same with the
  true ego speed, ``noisy_lag1s`` with frames 1 s apart, ``noisy_cues`` with what looks stopped (a
  static box, hazard lamps the camera shows) taken as stopped.

Next to it, the shipped model runs on the same drives exactly as ``lmm-fusion replay`` runs it
(:class:`~lmm_fusion.cycle.pipeline.FusionPipeline`, the safety guard included): its own action,
the published (guarded) action, and the guard applied to the expert's own label with the inputs the
pipeline gave it ("would the guard let the expert through?"), plus :func:`closing_guard`, the guard
with TTC from the LiDAR closing speed. Everything is reported per scenario family.

The scenes are rebuilt from the seeds in the dataset's ``manifest.json`` (``lmm-fusion dataset``):
the world is deterministic and is advanced through the same sensor schedule as in synthesis, so
frame for frame it is the world that was recorded. Only the recorded cloud, the pipeline's outputs
and the labels come from the bag.

``lmm-fusion ceiling DATASET [DATASET ...] --out DIR`` writes ``DIR/ceiling.json``, ``DIR/ceiling.md`` and
the per-frame ``DIR/rows.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmm_fusion.base.grid import INPUT_GRID, BevGrid
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig, VehicleGeometry
from lmm_fusion.base.vocabulary import Action, Scenario
from lmm_fusion.cycle import pipeline as pipeline_module
from lmm_fusion.cycle.bagfeed import iter_cycles
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.safety import SafetyConfig, stopping_speed_cap
from lmm_fusion.cycle.sync import SensorSync
from lmm_fusion.groundtruth.expert import (
    DETECT_RANGE,
    LANE_FREE_BEHIND,
    ExpertInput,
    Label,
    Obstacle,
    assess,
    in_ego_corridor,
    lane_free,
)
from lmm_fusion.groundtruth.messages import ground_truth_from_messages
from lmm_fusion.io.bags import BagReader
from lmm_fusion.synth.drive import DEFAULT_WARMUP, LIDAR_JITTER, START_TIME, rig_from_args, sensor_schedule
from lmm_fusion.synth.world import Boxes, Scene, World

log = logging.getLogger(__name__)

#: An object counts as seen by the LiDAR with at least this many returns on it.
MIN_LIDAR_POINTS = 3
#: Margin around an object's box within which a return counts as on it [m] (range noise, box edges).
POINT_MARGIN = 0.2
#: Returns at or below this height above the box bottom are ground [m].
GROUND_CLEARANCE = 0.15
#: Farthest distance at which the camera is taken to show an object [m] (a 1.7 m wide car is ~9 px
#: wide at 640 px, 90 deg HFOV).
CAMERA_RANGE = 60.0
#: Object speed perturbation for the relative-speed sensitivity [m/s]: one 0.5 m cell over 0.5 s.
SPEED_DELTA = 1.0
#: Variants of the scene, in the order they cut it down.
VARIANTS: tuple[str, ...] = ("truth", "grid", "lidar", "sensors", "noisy", "noisy_true_ego", "noisy_lag1s",
                             "noisy_cues")
ACTIONS = [a.name for a in Action]


# --------------------------------------------------------------------------------------- geometry
def footprint_samples(center_xy: np.ndarray, yaw: float, length: float, width: float,
                      step: float = 0.25) -> np.ndarray:
    """(M, 2) points covering an oriented rectangle (edges and interior, ``step`` m apart) in its
    parent frame [m]."""
    us = np.linspace(-length / 2, length / 2, max(2, math.ceil(length / step) + 1))
    ws = np.linspace(-width / 2, width / 2, max(2, math.ceil(width / step) + 1))
    uu, ww = np.meshgrid(us, ws)
    c, s = math.cos(yaw), math.sin(yaw)
    x = center_xy[0] + c * uu - s * ww
    y = center_xy[1] + s * uu + c * ww
    return np.stack([x.ravel(), y.ravel()], axis=-1)


def in_grid(center_xy: np.ndarray, yaw: float, length: float, width: float, grid: BevGrid = INPUT_GRID) -> bool:
    """Whether any part of the footprint lies inside ``grid``'s x/y bounds (base_link, metres)."""
    p = footprint_samples(np.asarray(center_xy, float), yaw, length, width)
    inside = (p[:, 0] >= grid.x_min) & (p[:, 0] < grid.x_max) & (p[:, 1] >= grid.y_min) & (p[:, 1] < grid.y_max)
    return bool(inside.any())


def box_corners(center: np.ndarray, yaw: float, size: np.ndarray) -> np.ndarray:
    """(8, 3) corners of an oriented box (``center`` xyz, ``size`` length/width/height) [m]."""
    ln, wd, ht = (float(v) / 2 for v in size)
    c, s = math.cos(yaw), math.sin(yaw)
    out = []
    for du in (-ln, ln):
        for dw in (-wd, wd):
            for dz in (-ht, ht):
                out.append((center[0] + c * du - s * dw, center[1] + s * du + c * dw, center[2] + dz))
    return np.asarray(out, np.float64)


def in_camera_view(points_base: np.ndarray, rig: SensorRig, max_range: float = CAMERA_RANGE) -> bool:
    """Whether any of ``points_base`` (N, 3) [m, base_link] projects into the image of ``rig``'s
    camera, in front of it (optical z > 0.3 m, as the renderer clips) and within ``max_range``.
    Occlusion is not modelled (the camera's view is an upper bound)."""
    t = np.linalg.inv(rig.camera_optical_to_base())
    p = np.asarray(points_base, np.float64).reshape(-1, 3)
    q = p @ t[:3, :3].T + t[:3, 3]
    ok = (q[:, 2] > 0.3) & (np.linalg.norm(q, axis=1) <= max_range)
    if not ok.any():
        return False
    cam = rig.camera
    u = cam.fx * q[ok, 0] / q[ok, 2] + cam.cx
    v = cam.fy * q[ok, 1] / q[ok, 2] + cam.cy
    return bool(((u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)).any())


def points_on_box(points_base: np.ndarray, center: np.ndarray, yaw: float, size: np.ndarray,
                  margin: float = POINT_MARGIN) -> int:
    """Number of ``points_base`` (N, >=3) [m] inside the box grown by ``margin``, above its bottom
    by more than :data:`GROUND_CLEARANCE` (ground returns next to an object are not on it)."""
    if points_base.size == 0:
        return 0
    ln, wd, ht = (float(v) for v in size)
    r = 0.5 * math.hypot(ln, wd) + margin
    dx = points_base[:, 0] - center[0]
    dy = points_base[:, 1] - center[1]
    near = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if not near.any():
        return 0
    dx, dy, z = dx[near], dy[near], points_base[near, 2]
    c, s = math.cos(yaw), math.sin(yaw)
    u, w = c * dx + s * dy, -s * dx + c * dy
    bottom = center[2] - ht / 2
    sel = (np.abs(u) <= ln / 2 + margin) & (np.abs(w) <= wd / 2 + margin)
    sel &= (z > bottom + GROUND_CLEARANCE) & (z <= bottom + ht + margin)
    return int(sel.sum())


def grid_rear_blind_zone(grid: BevGrid = INPUT_GRID,
                         vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> tuple[float, float]:
    """x range [m, base_link] the expert's lane-free check reaches behind the grid's back edge:
    ``(rear - LANE_FREE_BEHIND, grid.x_min)`` with the ego rear at ``front_offset - length``; empty
    (lo >= hi) when the grid covers it."""
    return (vehicle.rear_offset - LANE_FREE_BEHIND, grid.x_min)


# ------------------------------------------------------------------------------------ world pass
def obstacle_boxes(scene: Scene) -> list[int]:
    """Indices into ``scene.boxes`` of the expert's obstacles, in the order of
    ``scene.expert_input.obstacles`` (the world drops buildings and overhead structures)."""
    b: Boxes = scene.boxes
    idx = [i for i in range(len(b)) if b.kind[i] != "building" and b.center[i, 2] - b.size[i, 2] / 2 <= 2.0]
    if len(idx) != len(scene.expert_input.obstacles):
        raise ValueError(f"scene at t={scene.t}: {len(idx)} obstacle boxes for "
                         f"{len(scene.expert_input.obstacles)} expert obstacles")
    return idx


@dataclass
class CameraView:
    """What one camera frame shows: per obstacle (expert order) whether it is in view, the lamps as
    the expert would read them, and the light ahead (None when no housing is in view)."""

    episode: int
    visible: list[bool]
    lamps: list[str]
    light: Any


@dataclass
class FrameTruth:
    """One labelled LiDAR frame of the rebuilt world (``t`` world time [s])."""

    t: float
    episode: int
    scenario: Scenario
    inp: ExpertInput
    label: Label
    centers: np.ndarray  # (K, 3) obstacle box centres, base_link [m]
    yaws: np.ndarray  # (K,)
    sizes: np.ndarray  # (K, 3)
    in_grid: list[bool]
    camera: CameraView | None = None


def camera_view(scene: Scene, episode: int, rig: SensorRig) -> CameraView:
    """:class:`CameraView` of ``scene`` for ``rig``'s camera."""
    b = scene.boxes
    vis = [in_camera_view(box_corners(b.center[i], float(b.yaw[i]), b.size[i]), rig) for i in obstacle_boxes(scene)]
    lamps = [o.lamps for o in scene.expert_input.obstacles]
    light_seen = any(in_camera_view(lp.center[None, :], rig, max_range=100.0) for lp in scene.lamps)
    return CameraView(episode, vis, lamps, scene.expert_input.light if light_seen else None)


def rebuild_world(seed: int, scenario: Scenario | None, seconds: float, start: float, lamp_cues: bool,
                  rig: SensorRig, warmup: float = DEFAULT_WARMUP, with_camera: bool = True
                  ) -> tuple[dict[int, FrameTruth], dict[int, CameraView]]:
    """Advance the world of a drive (as :func:`lmm_fusion.synth.drive.synthesize` does, same seed
    streams and event schedule). Returns labelled LiDAR frames and camera views keyed by
    microseconds of world time (no camera views with ``with_camera`` False)."""
    seq = np.random.SeedSequence(int(seed))
    world_ss, _cam, _lidar, _gnss, stamp_ss = seq.spawn(5)
    world = World(np.random.default_rng(world_ss), [scenario] if scenario is not None else None, t0=0.0,
                  lamp_cues=lamp_cues, vehicle=rig.vehicle)
    warm = min(warmup, start)
    first = start - warm
    events = [(round(first + t, 6), name)
              for t, name in sensor_schedule(warm + seconds, rig, np.random.default_rng(stamp_ss))]
    frames: dict[int, FrameTruth] = {}
    views: dict[int, CameraView] = {}
    for t, sensor in events:
        world.advance(t)
        key = round(t * 1e6)
        if sensor == "camera" and with_camera:
            views[key] = camera_view(world.scene(), world.episode_index, rig)
        elif sensor == "lidar" and t >= start - 3 * LIDAR_JITTER - 1e-6:
            scene = world.scene()
            idx = obstacle_boxes(scene)
            b = scene.boxes
            frames[key] = FrameTruth(
                t=t, episode=world.episode_index, scenario=scene.scenario, inp=scene.expert_input, label=scene.label(),
                centers=b.center[idx].copy(), yaws=b.yaw[idx].copy(), sizes=b.size[idx].copy(),
                in_grid=[in_grid(b.center[i, :2], float(b.yaw[i]), float(b.size[i, 0]), float(b.size[i, 1]))
                         for i in idx])
    return frames, views


# ------------------------------------------------------------------------------------- variants
def _lane_free_both(inp: ExpertInput, label: Label) -> tuple[bool, bool]:
    """The expert's free-left/right verdicts (as computed for a stopped lead) of ``inp``."""
    beyond = label.distance + 20.0 if math.isfinite(label.distance) else 80.0
    return lane_free(inp, +1, beyond), lane_free(inp, -1, beyond)


def lead_outside_grid(fr: FrameTruth) -> bool:
    """Whether the expert's lead object (nearest in the ego corridor ahead) does not reach the grid."""
    ahead = [(o.gap, g) for o, g in zip(fr.inp.obstacles, fr.in_grid, strict=True)
             if in_ego_corridor(o, fr.inp.vehicle) and o.gap + o.length > 0.0 and o.gap < DETECT_RANGE]
    return bool(ahead) and not min(ahead)[1]


def outside_grid_blockers(fr: FrameTruth) -> list[int]:
    """Obstacles (expert order) that block a neighbouring lane for the expert but do not reach the
    BEV grid: removing all of them changes the lane-free verdict of that side."""
    lead_far = fr.label.distance if math.isfinite(fr.label.distance) else 0.0
    beyond = lead_far + 15.0
    out = []
    for side in (+1, -1):
        full = lane_free(fr.inp, side, beyond)
        if full:
            continue
        kept = tuple(o for o, g in zip(fr.inp.obstacles, fr.in_grid, strict=True) if g)
        if lane_free(replace(fr.inp, obstacles=kept), side, beyond):
            out += [i for i, g in enumerate(fr.in_grid) if not g]
    return sorted(set(out))


@dataclass
class CycleObs:
    """What the pipeline saw and did in one cycle (actions as ints)."""

    model_action: int
    published: int
    guard_on_expert: int
    guard_on_expert_reason: str
    ego_speed_est: float | None
    lidar_points_on: list[int]
    camera: CameraView | None
    lidar_free_distance: float


History = dict[float, tuple[FrameTruth, list[bool]]]


def two_frame_speeds(fr: FrameTruth, past: tuple[FrameTruth, list[bool]] | None, seen: Sequence[bool],
                     ego_speed: float, cell: float = INPUT_GRID.cell) -> list[float | None]:
    """Each obstacle's speed along the road [m/s] as two BEV frames show it: ``ego_speed`` plus the
    change of its gap, both gaps quantised to ``cell`` m, over the time between the frames (the
    frames are in ``base_link``, not ego-motion compensated: a stopped object moves back by the
    ego's travel). None where either frame lacks it (not seen now or then, another episode)."""
    out: list[float | None] = [None] * len(fr.inp.obstacles)
    if past is None:
        return out
    prev, prev_seen = past
    if prev.episode != fr.episode or len(prev.inp.obstacles) != len(fr.inp.obstacles) or fr.t <= prev.t:
        return out
    dt = fr.t - prev.t
    for i, (o, then) in enumerate(zip(fr.inp.obstacles, prev.inp.obstacles, strict=True)):
        if seen[i] and prev_seen[i]:
            out[i] = ego_speed + (math.floor(o.gap / cell) - math.floor(then.gap / cell)) * cell / dt
    return out


#: Variants with measured speeds: (name, history lag [s], ego speed from GNSS (else the true one)).
NOISY_VARIANTS: tuple[tuple[str, float, bool], ...] = (
    ("noisy", 0.5, True), ("noisy_true_ego", 0.5, False), ("noisy_lag1s", 1.0, True))


def stopped_by_appearance(o: Obstacle, camera_lamps: str, camera_sees: bool) -> bool:
    """Whether an object is stopped by what it looks like, whatever its measured motion: a static
    obstacle (box shape, LiDAR intensity) or a vehicle whose hazard lamps the camera shows."""
    return o.kind == "obstacle" or (camera_sees and camera_lamps == "hazard")


def variant_inputs(fr: FrameTruth, obs: CycleObs, history: History) -> tuple[dict[str, ExpertInput], dict[str, Any]]:
    """The cut-down expert inputs of one frame (see the module docstring) and per-frame facts.
    ``history``: history lag [s] -> (the labelled frame that long before, its LiDAR-seen flags)."""
    obst = list(fr.inp.obstacles)
    lidar_seen = [g and n >= MIN_LIDAR_POINTS for g, n in zip(fr.in_grid, obs.lidar_points_on, strict=True)]
    cam = obs.camera if obs.camera is not None and obs.camera.episode == fr.episode else None
    cam_vis = cam.visible if cam is not None and len(cam.visible) == len(obst) else [False] * len(obst)
    cam_lamps = cam.lamps if cam is not None and len(cam.lamps) == len(obst) else [""] * len(obst)
    out = {"truth": fr.inp}
    out["grid"] = replace(fr.inp, obstacles=tuple(o for o, g in zip(obst, fr.in_grid, strict=True) if g))
    out["lidar"] = replace(fr.inp, obstacles=tuple(o for o, s in zip(obst, lidar_seen, strict=True) if s))
    sens = []
    for o, ls, cv, lamp in zip(obst, lidar_seen, cam_vis, cam_lamps, strict=True):
        if ls or cv:
            sens.append(replace(o, lamps=lamp if cv else ""))
    light = cam.light if cam is not None else None
    out["sensors"] = replace(fr.inp, obstacles=tuple(sens), light=light)
    # noisy: ego speed from the GNSS estimate; object speeds from two frames (camera-only objects and
    # objects new in the view keep their true speed: an upper bound)
    v_gnss = obs.ego_speed_est if obs.ego_speed_est is not None else 0.0
    unseen = 0
    for name, lag, gnss in NOISY_VARIANTS:
        v_ego = v_gnss if gnss else fr.inp.ego_speed
        speeds = two_frame_speeds(fr, history.get(lag), lidar_seen, v_ego)
        noisy = []
        for o, ls, cv, lamp, sp in zip(obst, lidar_seen, cam_vis, cam_lamps, speeds, strict=True):
            if not (ls or cv):
                continue
            if sp is None and name == "noisy":
                unseen += 1
            noisy.append(replace(o, speed=float(o.speed if sp is None else sp), lamps=lamp if cv else ""))
        out[name] = replace(fr.inp, ego_speed=float(v_ego), obstacles=tuple(noisy), light=light)
    # noisy_cues: as noisy, but what looks stopped is taken as stopped
    cued = []
    kept = [(o, lamp, cv) for o, ls, cv, lamp in zip(obst, lidar_seen, cam_vis, cam_lamps, strict=True) if ls or cv]
    for o_noisy, (o, lamp, cv) in zip(out["noisy"].obstacles, kept, strict=True):
        cued.append(replace(o_noisy, speed=0.0) if stopped_by_appearance(o, lamp, cv) else o_noisy)
    out["noisy_cues"] = replace(out["noisy"], obstacles=tuple(cued))
    facts = {"lidar_seen": lidar_seen, "speed_unseen": unseen}
    return out, facts


def speed_sensitive(inp: ExpertInput, action: Action, delta: float = SPEED_DELTA) -> bool:
    """Whether moving every object's speed by ±``delta`` m/s (one BEV cell per history lag) changes
    the expert's action: the decision hinges on relative speed / TTC."""
    for d in (-delta, delta):
        moved = tuple(replace(o, speed=max(0.0, o.speed + d) if o.kind != "pedestrian" else o.speed)
                      for o in inp.obstacles)
        if assess(replace(inp, obstacles=moved)).action != action:
            return True
    return False


def ego_speed_sensitive(inp: ExpertInput, action: Action, delta: float) -> bool:
    """Whether moving the ego speed by ±``delta`` m/s changes the expert's action."""
    return any(assess(replace(inp, ego_speed=max(0.0, inp.ego_speed + d))).action != action for d in (-delta, delta))


def stopped_moving_ambiguous(inp: ExpertInput, label: Label) -> bool:
    """A lead whose true speed decides the stopped-lead branch (pass/stop) against the moving-lead
    branch (follow/slow): the same geometry gives another action when the lead is taken as
    moving at the ego speed (stopped one) or as stopped (moving one) — the cue a single BEV frame lacks."""
    lead = [o for o in inp.obstacles if o.kind != "pedestrian"]
    if not lead or not math.isfinite(label.distance):
        return False
    swapped = []
    for o in inp.obstacles:
        if o.kind == "pedestrian":
            swapped.append(o)
        elif o.speed < 0.5:
            swapped.append(replace(o, speed=inp.ego_speed))
        else:
            swapped.append(replace(o, speed=0.0))
    return assess(replace(inp, obstacles=tuple(swapped))).action != label.action


#: A change of the LiDAR free distance faster than this is another object, not closing [m/s].
MAX_CLOSING = 25.0


def closing_guard(action: Action, lidar_distance: float, closing: float | None,
                  cfg: SafetyConfig | None = None, ego_speed: float | None = None) -> Action:
    """The guard's rules (:func:`lmm_fusion.cycle.safety.apply_guard` as shipped, action only) with two
    changes the study tests: TTC is the LiDAR free distance over its *closing speed* (its change
    between two LiDAR frames, ``closing`` [m/s]; None when unknown: a new object, then over
    ``ego_speed`` as shipped) instead of over the ego speed, and a lane change is not stopped by the
    stopping-distance cap of the lane it leaves (only by TTC)."""
    cfg = cfg or SafetyConfig()
    ttc = math.inf
    if not math.isfinite(lidar_distance):
        pass
    elif closing is not None:
        if closing > 0.1:
            ttc = lidar_distance / closing
    elif ego_speed is not None and ego_speed > 0.1:
        ttc = lidar_distance / ego_speed
    if ttc < cfg.ttc_stop:
        return Action.STOP
    if ttc < cfg.ttc_slow and action in (Action.KEEP_LANE, Action.FOLLOW):
        return Action.SLOW_DOWN
    lane_change = action in (Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT)
    if not lane_change and action != Action.STOP and stopping_speed_cap(lidar_distance, cfg) < cfg.stop_speed:
        return Action.STOP
    return action


class GuardTap:
    """Records what the pipeline hands the safety guard each cycle, so that the very same guard can be
    run on the expert's own label with exactly those inputs (free distance, ego speed, and whatever
    else that version of the guard takes). Use as a context manager around the cycles."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        self._original = pipeline_module.apply_guard

    def __enter__(self) -> GuardTap:
        def tap(a: Any, *args: Any, **kwargs: Any) -> Any:
            self.args, self.kwargs = args, kwargs
            return self._original(a, *args, **kwargs)

        pipeline_module.apply_guard = tap
        return self

    def __exit__(self, *exc: object) -> None:
        pipeline_module.apply_guard = self._original

    def on(self, a: Any) -> Any:
        """The guard on ``a`` with the inputs of the latest cycle (None before the first)."""
        return None if self.args is None else self._original(a, *self.args, **self.kwargs)


# ------------------------------------------------------------------------------------- bag pass
@dataclass
class DriveResult:
    path: str
    scenario: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    unmatched_cycles: int = 0
    label_mismatch: int = 0


def study_drive(bag: Path, seed: int, scenario: Scenario | None, seconds: float, start: float,
                lamp_cues: bool, rig: SensorRig, pipeline: FusionPipeline) -> DriveResult:
    """Replay one drive through ``pipeline`` and compare, cycle by cycle, with the rebuilt world."""
    frames, views = rebuild_world(seed, scenario, seconds, start, lamp_cues, rig)
    view_keys = np.array(sorted(views), np.int64)
    pipeline.preprocessor.reset()
    ingest = SensorIngest(SensorSync(), rig, extrinsics=pipeline.extrinsics, preprocessor=pipeline.preprocessor)
    res = DriveResult(str(bag), scenario.name if scenario is not None else "ALL")
    lag = float(pipeline.model_cfg.bev_history_lag)
    seen_by_key: dict[int, list[bool]] = {}
    keys_sorted: list[int] = []
    with BagReader([bag]) as reader, GuardTap() as tap:
        for c in iter_cycles(reader, ingest, 10.0, with_ground_truth=True):
            tap.args = None
            a = pipeline.cycle(c.snapshot)
            gt_msgs = {k: v for k, v in c.ground_truth.items() if c.t - v[0] <= 0.5}
            if not gt_msgs:
                continue
            gt = ground_truth_from_messages(gt_msgs)
            if gt is None:
                continue
            key = round((gt.stamp - START_TIME) * 1e6)
            lidar_stamp = c.snapshot.stamps.get("lidar")
            fr = frames.get(key)
            if fr is None or lidar_stamp is None or round((lidar_stamp - START_TIME) * 1e6) != key:
                res.unmatched_cycles += 1  # the cycle's LiDAR frame is not the labelled one
                continue
            if key in seen_by_key:  # a second cycle on the same LiDAR frame: scored once
                continue
            if gt.action is not None and int(gt.action) != int(fr.label.action):
                res.label_mismatch += 1
            pts = pipeline.lidar_in_base(c.snapshot.frames.get("lidar"), c.snapshot.frame_ids.get("lidar"))
            pts = np.zeros((0, 3)) if pts is None else np.asarray(pts, np.float64)
            pts = pts[pts[:, 2] > 0.1] if pts.size else pts
            on = [points_on_box(pts, fr.centers[i], float(fr.yaws[i]), fr.sizes[i]) for i in range(len(fr.yaws))]
            cam_stamp = c.snapshot.stamps.get("camera")
            cam = None
            if cam_stamp is not None and view_keys.size:
                ck = round((cam_stamp - START_TIME) * 1e6)
                j = int(np.searchsorted(view_keys, ck, side="right")) - 1
                if j >= 0:
                    cam = views[int(view_keys[j])]
            lab = fr.label
            expert_as = replace(a, action=lab.action, target_speed=float(lab.target_speed), ttc=float(lab.ttc),
                                distance=float(lab.distance))
            guarded = tap.on(expert_as)
            if guarded is None:  # the guard did not run this cycle (no valid assessment)
                guarded = expert_as
            reason = guarded.rationale.split("[guard: ", 1)[1].rstrip("]") if "[guard: " in guarded.rationale else ""
            obs = CycleObs(int(a.model_action), int(a.action), int(guarded.action), reason, a.ego_speed, on, cam,
                           float(a.lidar_free_distance))
            # the history frames: the labelled frames nearest each lag earlier
            history: History = {}
            for h in {lag, *(v[1] for v in NOISY_VARIANTS)}:
                target = key - round(h * 1e6)
                cands = [k for k in keys_sorted[-16:] if abs(k - target) <= 0.025 * 1e6]
                if cands:
                    pk = min(cands, key=lambda k: abs(k - target))
                    history[h] = (frames[pk], seen_by_key[pk])
            inputs, facts = variant_inputs(fr, obs, history)
            seen_by_key[key] = facts["lidar_seen"]
            keys_sorted.append(key)
            res.rows.append(_row(fr, obs, inputs, facts, lag))
    return res


def _row(fr: FrameTruth, obs: CycleObs, inputs: dict[str, ExpertInput], facts: dict[str, Any],
         lag: float) -> dict[str, Any]:
    lab = fr.label
    acts = {name: int(assess(inp).action) for name, inp in inputs.items()}
    # (a) lane decisions that depend on objects outside the grid
    stopped_branch = lab.rationale.startswith(("pass left", "pass right")) or "lane blocked" in lab.rationale
    blockers = outside_grid_blockers(fr) if stopped_branch else []
    behind = [i for i in blockers if fr.centers[i, 0] + fr.sizes[i, 0] / 2 < INPUT_GRID.x_min]
    v = fr.inp.ego_speed
    return {
        "t": round(fr.t, 6),
        "family": fr.scenario.name,
        "truth": int(lab.action),
        "rationale": lab.rationale.split(":", 1)[0],
        **{f"ceiling_{k}": v2 for k, v2 in acts.items()},
        "model": obs.model_action,
        "published": obs.published,
        "guard_on_expert": obs.guard_on_expert,
        "guard_reason": obs.guard_on_expert_reason,
        "expert_ttc": lab.ttc if math.isfinite(lab.ttc) else None,
        "lead_outside_grid": lead_outside_grid(fr),
        "lidar_free_distance": obs.lidar_free_distance if math.isfinite(obs.lidar_free_distance) else None,
        "expert_distance": lab.distance if math.isfinite(lab.distance) else None,
        "ego_speed": v,
        "ego_speed_est": obs.ego_speed_est,
        "stopped_branch": stopped_branch,
        "lane_check_outside_grid": bool(blockers),
        "lane_check_behind_grid": bool(behind),
        "speed_sensitive": speed_sensitive(fr.inp, lab.action),
        "ego_speed_sensitive_0p5": ego_speed_sensitive(fr.inp, lab.action, 0.5),
        "stopped_moving_ambiguous": stopped_moving_ambiguous(fr.inp, lab),
        "speed_unseen": facts["speed_unseen"],
        # a stopped object's shift between the two BEV frames, in cells (not ego-motion compensated)
        "stopped_shift_cells": v * lag / INPUT_GRID.cell,
    }


def add_closing_guard(rows: list[dict[str, Any]], lag: float = 0.5, cfg: SafetyConfig | None = None) -> None:
    """Add ``closing_guard_on_expert`` / ``closing_guard_on_model`` (:func:`closing_guard`) to the
    rows of the study, in place. The closing speed is the change of ``lidar_free_distance`` since the
    row of the same drive nearest ``lag`` s earlier (at most ``0.4 lag`` off: the guard keeps its own
    range history, frames the study skips included); a drive is a run of rows with rising ``t``."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i < len(rows) and rows[i]["t"] > rows[i - 1]["t"] and rows[i].get("drive") == rows[i - 1].get("drive"):
            continue
        drive = rows[start:i]
        ts = np.array([r["t"] for r in drive])
        for r in drive:
            d_now = math.inf if r["lidar_free_distance"] is None else float(r["lidar_free_distance"])
            closing = None
            j = int(np.argmin(np.abs(ts - (r["t"] - lag))))
            past = drive[j]
            near = abs(ts[j] - (r["t"] - lag)) <= 0.4 * lag
            if near and past["lidar_free_distance"] is not None and math.isfinite(d_now):
                c = (float(past["lidar_free_distance"]) - d_now) / (r["t"] - past["t"])
                closing = c if abs(c) <= MAX_CLOSING else None
            v = r["ego_speed_est"]
            r["closing_guard_on_expert"] = int(closing_guard(Action(r["truth"]), d_now, closing, cfg, v))
            r["closing_guard_on_model"] = int(closing_guard(Action(r["model"]), d_now, closing, cfg, v))
        start = i


# ------------------------------------------------------------------------------------ aggregate
def _frac(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _confusion(rows: Sequence[dict[str, Any]], key: str) -> list[list[int]]:
    m = np.zeros((len(ACTIONS), len(ACTIONS)), np.int64)
    for r in rows:
        m[r["truth"], r[key]] += 1
    return m.tolist()


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-family and overall tables of the study (see :func:`format_markdown`)."""
    fams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        fams[r["family"]].append(r)
    fams_sorted = {f.name: fams[f.name] for f in Scenario if f.name in fams}

    def table(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        t: dict[str, Any] = {"frames": n}
        for vname in VARIANTS:
            t[f"ceiling_{vname}"] = _frac(sum(r[f"ceiling_{vname}"] == r["truth"] for r in rs), n)
        t["model"] = _frac(sum(r["model"] == r["truth"] for r in rs), n)
        t["published"] = _frac(sum(r["published"] == r["truth"] for r in rs), n)
        t["guard_on_expert"] = _frac(sum(r["guard_on_expert"] == r["truth"] for r in rs), n)
        t["closing_guard_on_expert"] = _frac(sum(r["closing_guard_on_expert"] == r["truth"] for r in rs), n)
        t["closing_guard_on_model"] = _frac(sum(r["closing_guard_on_model"] == r["truth"] for r in rs), n)
        t["lead_outside_grid"] = sum(r["lead_outside_grid"] for r in rs)
        lane = [r for r in rs if r["stopped_branch"]]
        t["stopped_lead_frames"] = len(lane)
        t["lane_change_frames"] = sum(r["truth"] in (4, 5) for r in rs)
        t["lane_check_outside_grid"] = sum(r["lane_check_outside_grid"] for r in lane)
        t["lane_check_behind_grid"] = sum(r["lane_check_behind_grid"] for r in lane)
        t["speed_sensitive"] = _frac(sum(r["speed_sensitive"] for r in rs), n)
        t["ego_speed_sensitive_0p5"] = _frac(sum(r["ego_speed_sensitive_0p5"] for r in rs), n)
        t["stopped_moving_ambiguous"] = _frac(sum(r["stopped_moving_ambiguous"] for r in rs), n)
        # guard vs expert
        over = [r for r in rs if r["published"] != r["model"]]
        t["guard_overrides"] = len(over)
        t["guard_fixes"] = sum(r["model"] != r["truth"] and r["published"] == r["truth"] for r in over)
        t["guard_breaks"] = sum(r["model"] == r["truth"] and r["published"] != r["truth"] for r in over)
        t["guard_neutral"] = len(over) - t["guard_fixes"] - t["guard_breaks"]
        t["guard_overrides_expert"] = sum(r["guard_on_expert"] != r["truth"] for r in rs)
        t["guard_overrides_expert_lane_change"] = sum(r["guard_on_expert"] != r["truth"] and r["truth"] in (4, 5)
                                                      for r in rs)
        sev = {0: 0, 4: 1, 5: 1, 1: 2, 2: 3, 3: 4}
        t["published_less_cautious"] = _frac(sum(sev[r["published"]] < sev[r["truth"]] for r in rs), n)
        t["model_less_cautious"] = _frac(sum(sev[r["model"]] < sev[r["truth"]] for r in rs), n)
        t["closing_guard_on_model_less_cautious"] = _frac(
            sum(sev[r["closing_guard_on_model"]] < sev[r["truth"]] for r in rs), n)
        # why the guard overrides the expert: a lane change it stops, a moving lead whose true TTC is
        # above the guard's threshold (distance / ego speed is headway, not TTC), or other
        ov = [r for r in rs if r["guard_on_expert"] != r["truth"]]
        t["guard_on_expert_why"] = {
            "lane_change_stopped": sum(r["truth"] in (4, 5) for r in ov),
            "of_it_ego_standing": sum(r["truth"] in (4, 5) and r["ego_speed"] < 0.1 for r in ov),
            "true_ttc_above_threshold": sum(r["truth"] not in (4, 5) and (r["expert_ttc"] is None or
                                                                          r["expert_ttc"] >= 3.0) for r in ov),
            "other": sum(r["truth"] not in (4, 5) and r["expert_ttc"] is not None and r["expert_ttc"] < 3.0
                         for r in ov)}
        reasons: Counter[str] = Counter(r["guard_reason"] for r in rs if r["guard_on_expert"] != r["truth"])
        t["guard_on_expert_reasons"] = dict(reasons.most_common(5))
        shifts = [r["stopped_shift_cells"] for r in rs]
        t["stopped_shift_cells_median"] = round(float(np.median(shifts)), 2) if shifts else None
        err = [r["ego_speed_est"] - r["ego_speed"] for r in rs if r["ego_speed_est"] is not None]
        t["ego_speed_abs_err_p50"] = round(float(np.median(np.abs(err))), 3) if err else None
        t["ego_speed_abs_err_p95"] = round(float(np.percentile(np.abs(err), 95)), 3) if err else None
        t["speed_unseen_frames"] = sum(r["speed_unseen"] > 0 for r in rs)
        return t

    return {"overall": table(rows), "families": {f: table(rs) for f, rs in fams_sorted.items()},
            "confusion": {f: {"model": _confusion(rs, "model"), "published": _confusion(rs, "published"),
                              "ceiling_noisy": _confusion(rs, "ceiling_noisy")}
                          for f, rs in fams_sorted.items()}}


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def format_markdown(report: dict[str, Any]) -> str:
    """The study's tables as Markdown."""
    s = report["summary"]
    fams = [*list(s["families"].items()), ("overall", s["overall"])]
    mism = sum(d["label_mismatch"] for d in report["drives"])
    out = [f"Drives: {len(report['drives'])} ({report['frames']} labelled frames, {mism} whose rebuilt label "
           f"differs from the recorded one); dataset seeds {report['dataset_seeds']}; model {report['model']}.", ""]
    out += ["| family | frames | " + " | ".join(v.replace("_", " ") for v in VARIANTS)
            + " | model | published | guard on expert |",
            "|---" * (len(VARIANTS) + 5) + "|"]
    for name, t in fams:
        out.append(f"| {name.lower()} | {t['frames']} | " + " | ".join(
            _fmt(t[k]) for k in (*(f"ceiling_{v}" for v in VARIANTS), "model", "published", "guard_on_expert"))
            + " |")
    out += ["", "| family | stopped-lead frames | lane change frames | lead beyond grid | "
                "lane check needs outside grid | of it behind x_min | speed ±1 m/s flips | ego ±0.5 m/s flips | "
                "stopped/moving flips | "
                "stopped-object shift [cells] | GNSS speed abs err p50 / p95 [m/s] |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in fams:
        out.append(f"| {name.lower()} | " + " | ".join(_fmt(t[k]) for k in (
            "stopped_lead_frames", "lane_change_frames", "lead_outside_grid", "lane_check_outside_grid",
            "lane_check_behind_grid",
            "speed_sensitive", "ego_speed_sensitive_0p5", "stopped_moving_ambiguous", "stopped_shift_cells_median"))
            + f" | {_fmt(t['ego_speed_abs_err_p50'])} / {_fmt(t['ego_speed_abs_err_p95'])} |")
    out += ["", "| family | guard changes model | fixes | breaks | neutral | guard overrides expert | "
                "of them expert changes lane | published less cautious | model less cautious | "
                "top reasons (guard on expert) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in fams:
        reasons = "; ".join(f"{k or 'speed only'} ×{v}" for k, v in t["guard_on_expert_reasons"].items())
        out.append(f"| {name.lower()} | " + " | ".join(_fmt(t[k]) for k in (
            "guard_overrides", "guard_fixes", "guard_breaks", "guard_neutral", "guard_overrides_expert",
            "guard_overrides_expert_lane_change", "published_less_cautious", "model_less_cautious")) +
            f" | {reasons} |")
    out += ["", "| family | guard overrides expert | lane change stopped | of it ego standing | "
                "true TTC ≥ 3 s | other | closing-speed guard on expert | closing-speed guard on model | "
                "its less cautious |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in fams:
        w = t["guard_on_expert_why"]
        out.append(f"| {name.lower()} | {t['guard_overrides_expert']} | {w['lane_change_stopped']} | "
                   f"{w['of_it_ego_standing']} | {w['true_ttc_above_threshold']} | {w['other']} | "
                   f"{_fmt(t['closing_guard_on_expert'])} | {_fmt(t['closing_guard_on_model'])} | "
                   f"{_fmt(t['closing_guard_on_model_less_cautious'])} |")
    if "world_only" in report:
        w = report["world_only"]
        out += ["", f"Geometry only, {w['drives_per_family']} world drives of {w['seconds']:g} s per family "
                    f"(seed {w['seed']}, no sensors):", "",
                "| family | frames | stopped-lead | lane change | lead beyond grid | lane check needs outside grid "
                "| of it behind x_min | speed ±1 m/s flips |", "|---|---|---|---|---|---|---|---|"]
        for fam, c in w["families"].items():
            n = c.get("frames", 0)
            out.append(f"| {fam.lower()} | {n} | {c.get('stopped_lead', 0)} | {c.get('lane_change', 0)} | "
                       f"{c.get('lead_outside_grid', 0)} | {c.get('lane_check_outside_grid', 0)} | "
                       f"{c.get('lane_check_behind_grid', 0)} | {_fmt(_frac(c.get('speed_sensitive', 0), n))} |")
    out += ["", "Confusion (rows: expert, columns: " + ", ".join(a.lower() for a in ACTIONS) + ")", ""]
    for fam, m in s["confusion"].items():
        out.append(f"* {fam.lower()}: model {m['model']}; published {m['published']}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ run
def world_only(seed: int, drives_per_family: int, seconds: float, rig: SensorRig | None = None
               ) -> dict[str, dict[str, Any]]:
    """Geometry-only part of the study on many more scenes (no sensors rendered, no model): per
    family, labelled frames at 10 Hz, how many take the stopped-lead branch, how many of those hinge
    on an object outside the BEV grid (behind its back edge, or anywhere outside), how many have
    the lead beyond it, and how often ±1 m/s of object speed flips the action. Drive ``i`` of family
    ``f`` uses seed ``SeedSequence([seed, f, i])`` and starts at world time 0."""
    rig = rig or SensorRig()
    out: dict[str, dict[str, Any]] = {}
    for fam in Scenario:
        c: Counter[str] = Counter()
        for i in range(drives_per_family):
            drive_seed = int(np.random.SeedSequence([int(seed), int(fam), i]).generate_state(1)[0])
            frames, _ = rebuild_world(drive_seed, fam, seconds, 0.0, True, rig, warmup=0.0, with_camera=False)
            for fr in frames.values():
                lab = fr.label
                c["frames"] += 1
                stopped = lab.rationale.startswith(("pass left", "pass right")) or "lane blocked" in lab.rationale
                c["lane_change"] += lab.action in (Action.CHANGE_LANE_LEFT, Action.CHANGE_LANE_RIGHT)
                c["lead_outside_grid"] += lead_outside_grid(fr)
                c["speed_sensitive"] += speed_sensitive(fr.inp, lab.action)
                if stopped:
                    c["stopped_lead"] += 1
                    blockers = outside_grid_blockers(fr)
                    c["lane_check_outside_grid"] += bool(blockers)
                    c["lane_check_behind_grid"] += any(
                        fr.centers[k, 0] + fr.sizes[k, 0] / 2 < INPUT_GRID.x_min for k in blockers)
        out[fam.name] = dict(c)
    return out


def _manifest(dataset: Path) -> dict[str, Any]:
    path = dataset / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.json (make the drives with `lmm-fusion dataset`)")
    man: dict[str, Any] = json.loads(path.read_text())
    for key in ("seed", "camera", "lidar", "drives"):
        if key not in man:
            raise ValueError(f"{path}: field {key!r} missing")
    return man


def study(datasets: Sequence[Path], out: Path, model_dir: Path | None = None, limit: int | None = None,
          backend: str = "auto", world_drives: int = 0, world_seed: int = 0) -> dict[str, Any]:
    """Run the study on ``lmm-fusion dataset`` folders (``limit``: the first N drives of each);
    writes ``out/ceiling.json``, ``out/ceiling.md`` and the per-frame ``out/rows.jsonl``.
    ``world_drives`` > 0 adds :func:`world_only` with that many 20 s drives per family."""
    t0 = time.perf_counter()
    results: list[DriveResult] = []
    seeds = []
    model = ""
    history = (0.0, 0)
    for dataset in datasets:
        man = _manifest(dataset)
        seeds.append(man["seed"])
        rig = rig_from_args(camera=tuple(man["camera"]), lidar_beams=man["lidar"][0],
                            lidar_columns=man["lidar"][1])
        pipeline = FusionPipeline(model_dir, backend=backend, rig=rig, threads=1)
        pipeline.warmup()
        model = str(pipeline.model_dir)
        history = (float(pipeline.model_cfg.bev_history_lag), int(pipeline.model_cfg.bev_history_frames))
        for d in man["drives"][:limit] if limit else man["drives"]:
            r = study_drive(dataset / d["path"], int(d["seed"]), Scenario[d["scenario"]], float(d["seconds"]),
                            float(d.get("start", 0.0)), bool(man.get("lamp_cues", True)), rig, pipeline)
            log.info("ceiling: %s: %d frames, %d label mismatches", d["path"], len(r.rows), r.label_mismatch)
            results.append(r)
    rows = [dict(row, drive=k) for k, r in enumerate(results) for row in r.rows]
    add_closing_guard(rows)
    report = {
        "datasets": [str(d) for d in datasets], "dataset_seeds": seeds, "model": model, "frames": len(rows),
        "drives": [{"path": r.path, "family": r.scenario, "frames": len(r.rows), "unmatched_cycles": r.unmatched_cycles,
                    "label_mismatch": r.label_mismatch} for r in results],
        "grid": INPUT_GRID.as_dict(), "rear_blind_zone_x": list(grid_rear_blind_zone()),
        "history_lag_s": history[0], "history_frames": history[1],
        "wall_s": round(time.perf_counter() - t0, 1),
        "summary": summarise(rows),
    }
    if world_drives > 0:
        report["world_only"] = {"seed": world_seed, "drives_per_family": world_drives, "seconds": 20.0,
                                "families": world_only(world_seed, world_drives, 20.0)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "ceiling.md").write_text(format_markdown(report))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", type=Path, nargs="+", metavar="DATASET",
                   help="folders written by `lmm-fusion dataset` (with manifest.json)")
    p.add_argument("--out", type=Path, required=True, help="output folder (ceiling.json, ceiling.md, rows.jsonl)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped one)")
    p.add_argument("--drives", type=int, default=None, help="only the first N drives of each manifest")
    p.add_argument("--backend", default="auto", help="inference backend (default auto)")
    p.add_argument("--world-drives", type=int, default=0, metavar="N",
                   help="also the geometry-only counts on N world drives of 20 s per family (no sensors)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of those world drives")


def run(args: argparse.Namespace) -> int:
    try:
        report = study(args.datasets, args.out, args.model, args.drives, args.backend, args.world_drives,
                       args.world_seed)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.error("ceiling: %s", exc)
        return 2
    print(format_markdown(report))
    return 0

