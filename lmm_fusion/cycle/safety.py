"""Rule-based safety guard over the model's suggestion (ROS-free, transparent, unit-tested).

The network proposes an action and a target speed. The guard overrides only what the measurements
show to be unsafe: it never speeds up and never invents a manoeuvre the network did not propose.
Distances are from the front bumper (``VehicleGeometry.front_offset`` ahead of ``base_link``).

1. **Stopping distance** (ego lane). With free distance ``d`` ahead of the bumper [m] (the raw LiDAR
   measurement when LiDAR is used, unless the model's estimate is more than ``margin`` nearer: the model
   then sees what the LiDAR cannot, e.g. a stop line; the model's estimate without LiDAR), the speed is capped at
   ``v_max = sqrt(2 · a · (d − margin) + v_lead²)`` so the vehicle can stop ``margin`` metres short of
   where the obstacle stops, both braking at ``a`` [m/s²]; ``v_lead`` is the LiDAR obstacle's speed
   (ego speed − measured closing speed, rule 2), 0 when not measured. A cap below ``stop_speed`` turns
   the action into STOP.
2. **Time to collision** (ego lane). TTC is the smaller of the model's and the measured one: with
   LiDAR, its free distance ``d_L`` over the closing speed measured from the last ``closing_window``
   seconds of LiDAR free distances (:class:`RangeRate`: a moving lead is not a stopped one, and no
   GNSS noise enters); until that is measured (a new obstacle), ``d_L / ego speed`` (GNSS), the TTC
   if the obstacle stood still; without LiDAR, the model's distance over the ego speed. Below
   ``ttc_stop`` [s] the action is STOP at speed 0, whatever was proposed (no time to steer out
   either); below ``ttc_slow`` (4 s, where the policy slows for a moving lead) a KEEP_LANE/FOLLOW
   becomes SLOW_DOWN with the speed capped at ``slow_factor`` × the ego speed.
3. **Lane change** (CHANGE_LANE_LEFT/RIGHT proposed). The LiDAR must show the target lane free, as
   the policy demands (docs/synthetic_world.md, rule 2): no point above the ground in the target
   lane's corridor (a lane of ``lane_width`` beside the ego lane, less ``lane_intrusion`` on each
   side) from ``lane_free_behind`` m behind the ego's rear bumper to ``lane_free_beyond`` m beyond
   the ego-lane obstacle's far face (its near face plus at least ``obstacle_length``; with no obstacle,
   ``lane_free_ahead`` m ahead of the bumper); the ego-lane obstacle's own points reaching into that
   corridor do not count. Free: the change stands, its speed capped by rule 1 on the target lane's
   free distance, not the lane being left (a stopped car 2 m ahead does not stop a change into a free
   lane); rule 2's STOP still applies. Not free, or no LiDAR to look with: the change is refused and the
   ego-lane action replaces it: STOP when the obstacle is within the comfortable stopping distance
   ``v · reaction_time + v² / (2 · comfort_decel)`` + ``blocked_stop_margin``, else SLOW_DOWN to the
   speed from which a comfortable stop fits (KEEP_LANE when the ego lane is free); rules 1 and 2
   then apply as usual. Without GNSS the stopping distance is taken at ``max_speed``.
4. **Masked modalities.** Each masked modality scales the cap by ``degraded_factor``; without LiDAR
   the cap is also at most ``no_lidar_speed`` (nothing measures the geometry exactly).

Whenever a rule changes the action or lowers the speed, ``safety_override`` is set and the rationale
names the reason, e.g. ``"stop: obstacle 7.9 m ahead, TTC 0.6 s (lidar) [guard: TTC < 1.5 s]"`` or
``"slow down: obstacle 30.2 m ahead (lidar) [guard: left lane occupied 4.1 m ahead]"``.
The corridors are straight (``base_link`` x): on a curve of radius R a lane drifts sideways by about
x²/(2R) at x metres ahead (2.7 m at 40 m for R = 300 m), so far ahead another lane's object may fall into
a target corridor (a refused change) or a target-lane object outside it; the guard has no curvature
measurement yet (the GNSS yaw rate is too noisy at 10 Hz).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from lmm_fusion.base.rig import DEFAULT_VEHICLE, VehicleGeometry
from lmm_fusion.base.vocabulary import Action
from lmm_fusion.cycle.assessment import MASKED_CONFIDENCE_FACTOR, Assessment

#: Lane changes and the side they go to (+1 left, -1 right).
LANE_CHANGE_SIDE: dict[Action, int] = {Action.CHANGE_LANE_LEFT: 1, Action.CHANGE_LANE_RIGHT: -1}


@dataclass(frozen=True)
class SafetyConfig:
    """Guard parameters (metres, seconds, m/s, m/s²)."""

    decel: float = 4.0  # braking deceleration assumed for the stopping-distance cap [m/s²]
    margin: float = 3.0  # gap to keep to the obstacle at standstill [m]
    ttc_stop: float = 1.5  # TTC below which the guard forces a stop [s]
    ttc_slow: float = 4.0  # TTC below which the guard forces slowing down [s] (the policy slows below 4 s)
    slow_factor: float = 0.7  # speed cap as a fraction of the ego speed when slowing for TTC
    stop_speed: float = 0.5  # caps below this mean "stop" [m/s]
    degraded_factor: float = 0.8  # cap multiplier per masked modality
    no_lidar_speed: float = 10.0  # absolute cap without LiDAR [m/s]
    max_speed: float = 30.0  # absolute cap [m/s]
    corridor_half_width: float = 1.5  # half width of the ego corridor for the LiDAR free distance [m]
    ground_height: float = 0.3  # points at or below this z in base_link are ground [m]
    max_height: float = 2.5  # points above this z pass over the vehicle (bridges, signs) [m]
    max_range: float = 60.0  # free distance beyond this is "free" [m]
    # Lane changes (rule 3): the policy's own numbers (docs/synthetic_world.md) are the defaults.
    lane_width: float = 3.5  # width of the neighbouring lane the change goes to [m]
    lane_intrusion: float = 0.3  # an object reaching further than this into that lane blocks it [m]
    lane_free_behind: float = 8.0  # target lane free from this far behind the ego's rear bumper ... [m]
    lane_free_beyond: float = 10.0  # ... to this far beyond the ego-lane obstacle's far face [m]
    lane_free_ahead: float = 30.0  # ... or this far ahead of the bumper when the ego lane is free [m]
    obstacle_length: float = 5.0  # least length assumed for the ego-lane obstacle (LiDAR sees its near face) [m]
    reaction_time: float = 0.5  # reaction time of the comfortable stopping distance [s]
    comfort_decel: float = 3.0  # deceleration of the comfortable stopping distance [m/s²]
    blocked_stop_margin: float = 8.0  # refused change: STOP within comfortable stop + this of the obstacle [m]
    # Closing speed from successive LiDAR free distances (rule 2, :class:`RangeRate`).
    closing_window: float = 0.5  # the distances of this many seconds are fitted with a line [s]
    closing_jump: float = 1.0  # a distance this far off the fitted line is another obstacle: start again [m]

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        for name, value in vars(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"safety.{name} must be a finite number, got {value!r}")
        positive = ("decel", "ttc_slow", "corridor_half_width", "max_range", "max_speed", "lane_width",
                    "comfort_decel", "closing_window", "closing_jump")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"safety.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("margin", "ttc_stop", "stop_speed", "no_lidar_speed", "lane_intrusion", "lane_free_behind",
                     "lane_free_beyond", "lane_free_ahead", "obstacle_length", "reaction_time",
                     "blocked_stop_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"safety.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("slow_factor", "degraded_factor"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"safety.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.ttc_stop > self.ttc_slow:
            raise ValueError(f"safety.ttc_stop ({self.ttc_stop}) must be <= safety.ttc_slow ({self.ttc_slow})")
        if self.max_height <= self.ground_height:
            raise ValueError(f"safety.max_height ({self.max_height}) must be > safety.ground_height "
                             f"({self.ground_height})")
        if not self.lane_intrusion < self.lane_width / 2:
            raise ValueError(f"safety.lane_intrusion ({self.lane_intrusion}) must be < safety.lane_width / 2 "
                             f"({self.lane_width / 2})")


def lane_free_distance(points_base: np.ndarray, cfg: SafetyConfig = SafetyConfig(),
                       vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> float:
    """Free distance in the ego lane [m from the front bumper] from LiDAR points in ``base_link``.

    The bumper is ``vehicle.front_offset`` ahead of ``base_link``.

    ``points_base``: (N, >=3) x, y, z [m]. The nearest point ahead of the bumper, inside the straight
    corridor ``|y| <= corridor_half_width`` and between ``ground_height`` and ``max_height`` is the
    obstacle; +inf when there is none within ``max_range``.
    """
    pts = np.asarray(points_base)
    if pts.ndim != 2 or pts.shape[1] < 3 or pts.shape[0] == 0:
        return math.inf
    z = pts[:, 2]
    band = (z > cfg.ground_height) & (z < cfg.max_height)
    return _nearest_in_ego_lane(pts[band, 0] - vehicle.front_offset, pts[band, 1], cfg)


def _nearest_in_ego_lane(ahead: np.ndarray, y: np.ndarray, cfg: SafetyConfig) -> float:
    """The nearest of points at ``ahead`` [m from the bumper], ``y`` [m] (already in the height band)
    within ``max_range`` ahead in the ego corridor ``|y| <= corridor_half_width``; +inf for none (NaN
    points are never in it)."""
    sel = (ahead > 0) & (ahead <= cfg.max_range) & (np.abs(y) <= cfg.corridor_half_width)
    return float(ahead[sel].min()) if sel.any() else math.inf


@dataclass(frozen=True)
class LaneEvidence:
    """What one LiDAR frame shows of the ego lane and the lanes beside it (distances from the bumper).

    ``free_distance`` [m]: :func:`lane_free_distance` (+inf when free). ``obstacle_far`` [m]: the far end
    of the points contiguous with that nearest obstacle (gaps under 1.5 m, at most 20 m deep; +inf when
    free) — often its near face only, hence :attr:`SafetyConfig.obstacle_length`. ``left`` / ``right``:
    sorted (M,) positions along x [m from the bumper, negative = behind it] of the obstacle points in
    each neighbouring lane's corridor. ``rear`` [m]: the ego's rear bumper (−length).
    """

    free_distance: float
    obstacle_far: float
    left: np.ndarray = field(repr=False)
    right: np.ndarray = field(repr=False)
    rear: float

    def first_intrusion(self, side: int, start: float, end: float) -> float | None:
        """Position [m from the bumper] of the rear-most obstacle point in the lane on ``side``
        (+1 left, -1 right) between ``start`` and ``end``, None when there is none."""
        xs = self.left if side > 0 else self.right
        i = int(np.searchsorted(xs, start, side="left"))
        return float(xs[i]) if i < len(xs) and xs[i] <= end else None


#: Points of the ego-lane obstacle farther apart along x than this belong to different objects [m].
OBSTACLE_GAP = 1.5
#: The deepest ego-lane obstacle measured from its points [m] (a long truck).
OBSTACLE_MAX_DEPTH = 20.0
#: The widest single obstacle across the road [m] (a 3 x 2.2 m box turned by 0.3 rad spans ~2.9 m; a
#: truck 2.6 m): a contiguous span wider than this is two objects side by side.
OBSTACLE_MAX_WIDTH = 3.8


def lane_evidence(points_base: np.ndarray | None, cfg: SafetyConfig = SafetyConfig(),
                  vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> LaneEvidence:
    """:class:`LaneEvidence` of one cloud ``points_base`` (N, >=3) in ``base_link`` [m] (None or empty:
    everything free; the caller decides whether an empty cloud is evidence)."""
    empty = np.zeros(0, np.float64)
    rear = -vehicle.length
    pts = np.asarray(points_base) if points_base is not None else np.zeros((0, 3))
    if pts.ndim != 2 or pts.shape[1] < 3 or pts.shape[0] == 0:
        return LaneEvidence(math.inf, math.inf, empty, empty, rear)
    # One pass over the full cloud (the height band), then only the few points near the lanes (~10x faster
    # than filtering every column of a 100k-point cloud).
    z = pts[:, 2]
    band = np.flatnonzero((z > cfg.ground_height) & (z < cfg.max_height))
    x = pts[band, 0].astype(np.float64) - vehicle.front_offset
    y = pts[band, 1].astype(np.float64)
    near = (np.abs(y) < 1.5 * cfg.lane_width) & (x > rear - cfg.lane_free_behind - 1.0)
    near &= x < cfg.max_range + OBSTACLE_MAX_DEPTH
    x, y = x[near], y[near]
    free = _nearest_in_ego_lane(x, y, cfg)  # = lane_free_distance of the cloud
    far = math.inf
    own = np.zeros(len(x), bool)
    if math.isfinite(free):
        ego = np.sort(x[(np.abs(y) <= cfg.corridor_half_width) & (x >= free) & (x <= free + OBSTACLE_MAX_DEPTH)])
        gaps = np.flatnonzero(np.diff(ego) > OBSTACLE_GAP)
        far = float(ego[gaps[0]] if gaps.size else ego[-1])
        own = _own_points(x, y, free, far, cfg)
    inner = cfg.lane_width / 2 + cfg.lane_intrusion
    outer = 1.5 * cfg.lane_width - cfg.lane_intrusion
    left = np.sort(x[(y > inner) & (y < outer) & ~own])
    right = np.sort(x[(-y > inner) & (-y < outer) & ~own])
    return LaneEvidence(free, far, left, right, rear)


def _own_points(x: np.ndarray, y: np.ndarray, near: float, far: float, cfg: SafetyConfig) -> np.ndarray:
    """Mask of the points that belong to the ego-lane obstacle spanning ``near``..``far`` [m from the bumper]:
    those of its x range laterally contiguous (gaps under ``OBSTACLE_GAP`` / 3) with its points in the ego
    corridor. Why: a wide or yawed obstacle, or one on a curve (where the lane drifts sideways), reaches into
    a neighbouring corridor and must not block the lane that passes it. When the contiguous span is wider
    than :data:`OBSTACLE_MAX_WIDTH`, it is more than one object (a blocker beside it): nothing is excluded."""
    window = (x >= near - 0.3) & (x <= far + 0.3)
    ys = np.sort(y[window])
    in_ego = ys[np.abs(ys) <= cfg.corridor_half_width]
    own = np.zeros(len(x), bool)
    if not in_ego.size:
        return own
    lo_i, hi_i = int(np.searchsorted(ys, in_ego[0])), int(np.searchsorted(ys, in_ego[-1], side="right")) - 1
    step = OBSTACLE_GAP / 3
    while lo_i > 0 and ys[lo_i] - ys[lo_i - 1] < step:
        lo_i -= 1
    while hi_i < len(ys) - 1 and ys[hi_i + 1] - ys[hi_i] < step:
        hi_i += 1
    lo, hi = float(ys[lo_i]), float(ys[hi_i])
    if hi - lo > OBSTACLE_MAX_WIDTH:
        return own
    return window & (y >= lo) & (y <= hi)


@dataclass(frozen=True)
class LaneCheck:
    """Outcome of checking one neighbouring lane for a change: ``free``; ``start``/``end`` [m from the
    bumper] the stretch that must be free; ``intrusion`` [m] the first obstacle point in it (None when
    free or unknown); ``room`` [m] the free distance ahead in that lane (+inf when nothing ahead within
    the checked stretch and the sensor range); ``reason`` a few words for the rationale."""

    free: bool
    start: float
    end: float
    intrusion: float | None
    room: float
    reason: str


def check_lane(lanes: LaneEvidence | None, side: int, distance: float, cfg: SafetyConfig,
               vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> LaneCheck:
    """Rule 3: is the lane on ``side`` (+1 left, -1 right) free for passing an ego-lane obstacle at
    ``distance`` [m from the bumper, +inf = none]? ``lanes`` None (no LiDAR) is never free."""
    name = "left" if side > 0 else "right"
    rear = -vehicle.length if lanes is None else lanes.rear
    start = rear - cfg.lane_free_behind
    if math.isfinite(distance) and distance <= cfg.max_range:
        far = distance + cfg.obstacle_length
        if lanes is not None and math.isfinite(lanes.obstacle_far) and lanes.free_distance <= distance + 0.5:
            far = max(far, lanes.obstacle_far)  # the LiDAR saw this obstacle: its measured depth counts
        end = far + cfg.lane_free_beyond
    else:
        end = cfg.lane_free_ahead
    if lanes is None:
        return LaneCheck(False, start, end, None, 0.0, f"{name} lane not verified (no lidar)")
    hit = lanes.first_intrusion(side, start, end)
    if hit is not None:
        where = (f"{hit:.1f} m ahead" if hit >= 0 else "beside the vehicle" if hit >= rear
                 else f"{rear - hit:.1f} m behind the rear")
        return LaneCheck(False, start, end, hit, 0.0, f"{name} lane occupied {where}")
    beyond = lanes.first_intrusion(side, end, cfg.max_range)
    room = math.inf if beyond is None else beyond
    return LaneCheck(True, start, end, None, room, f"{name} lane free")


#: Fewest LiDAR distances (and least time span [s]) from which :class:`RangeRate` states a closing speed.
RANGE_RATE_MIN_SAMPLES = 3
RANGE_RATE_MIN_SPAN = 0.15


class RangeRate:
    """Closing speed [m/s, > 0 = approaching] on the ego-lane obstacle from successive LiDAR free
    distances: the slope of a least-squares line through the distances of the last
    ``cfg.closing_window`` seconds (at least 3 frames over 0.15 s). A distance more than
    ``cfg.closing_jump`` metres off the line's prediction (another object became the nearest, e.g. a
    cut-in) or a free lane starts the history again; until it is refilled the closing speed is unknown
    (None). Before the first line, a change of up to ``max_speed`` times the frame interval continues the
    history (a fast approach is not a new object). One instance per vehicle; not thread-safe (the cycle
    owns it)."""

    def __init__(self) -> None:
        self._history: deque[tuple[float, float]] = deque()
        self._closing: float | None = None

    def reset(self) -> None:
        self._history.clear()
        self._closing = None

    @property
    def closing(self) -> float | None:
        """The last closing speed [m/s] stated, None when unknown."""
        return self._closing

    def update(self, stamp: float | None, distance: float | None, cfg: SafetyConfig) -> float | None:
        """Add the free distance ``distance`` [m] of the LiDAR frame stamped ``stamp`` [s] and return the
        closing speed (None: unknown). The same frame again (stamp not newer) changes nothing."""
        if stamp is None or distance is None or not math.isfinite(distance) or distance > cfg.max_range:
            self.reset()
            return None
        h = self._history
        if h and stamp <= h[-1][0]:
            return self._closing
        if h:
            t_last, d_last = h[-1]
            dt = stamp - t_last
            if self._closing is not None:
                off = abs(distance - (d_last - self._closing * dt))
            else:  # no line yet: any approach up to max_speed (or a recession as fast) continues the history
                off = max(abs(distance - d_last) - cfg.max_speed * dt, 0.0)
            if off > cfg.closing_jump:
                h.clear()
        h.append((float(stamp), float(distance)))
        while h and h[0][0] < stamp - cfg.closing_window - 1e-6:
            h.popleft()
        self._closing = None
        if len(h) >= RANGE_RATE_MIN_SAMPLES and h[-1][0] - h[0][0] >= RANGE_RATE_MIN_SPAN:
            t = np.array([p[0] for p in h]) - h[-1][0]
            d = np.array([p[1] for p in h])
            tc = t - t.mean()
            self._closing = float(-(tc @ (d - d.mean())) / (tc @ tc))
        return self._closing


def stopping_speed_cap(distance: float, cfg: SafetyConfig, lead_speed: float = 0.0) -> float:
    """``sqrt(2·a·(d − margin) + v_lead²)`` [m/s] (0 when negative), ``max_speed`` when free.

    ``lead_speed`` [m/s, >= 0]: the obstacle's own speed away from the vehicle when measured (0: it stands
    still). Both braking at ``a``, the vehicle then still stops ``margin`` short of where the lead stops."""
    if not math.isfinite(distance):
        return cfg.max_speed
    room = 2.0 * cfg.decel * (distance - cfg.margin) + max(lead_speed, 0.0) ** 2
    return min(cfg.max_speed, math.sqrt(max(room, 0.0)))


def comfortable_stop_distance(speed: float, cfg: SafetyConfig) -> float:
    """``v · reaction_time + v² / (2 · comfort_decel)`` [m] at ``speed`` [m/s]."""
    v = max(speed, 0.0)
    return v * cfg.reaction_time + v * v / (2.0 * cfg.comfort_decel)


def _fmt(x: float, unit: str) -> str:
    return f"{x:.1f} {unit}"


def describe(action: Action, distance: float, ttc: float, source: str, masked: list[str]) -> str:
    """Short rationale: ``"<action>: obstacle D m ahead, TTC T s (source)"`` plus masked modalities."""
    parts = []
    if math.isfinite(distance):
        parts.append(f"obstacle {_fmt(distance, 'm')} ahead")
    else:
        parts.append("lane free")
    if math.isfinite(ttc):
        parts.append(f"TTC {_fmt(ttc, 's')}")
    text = f"{action.name.lower().replace('_', ' ')}: {', '.join(parts)} ({source})"
    if masked:
        text += f" [{'+'.join(masked)} masked]"
    return text


def apply_guard(a: Assessment, lidar_free_distance: float | None, ego_speed: float | None,
                cfg: SafetyConfig = SafetyConfig(), lanes: LaneEvidence | None = None,
                vehicle: VehicleGeometry = DEFAULT_VEHICLE, closing: float | None = None) -> Assessment:
    """Apply the rules of this module to a decoded assessment.

    ``lidar_free_distance`` [m] is :func:`lane_free_distance` of the current LiDAR frame (None when
    LiDAR is masked); ``ego_speed`` [m/s] comes from GNSS (None when GNSS is masked or invalid);
    ``lanes`` is :func:`lane_evidence` of the same frame (None: no lane change can be verified);
    ``closing`` [m/s] the :class:`RangeRate` closing speed on the obstacle at ``lidar_free_distance``
    (None: not measured).
    Returns a new Assessment with the guarded action, target speed, ttc/distance, flags and rationale.
    """
    if not a.valid:
        return a
    masked = a.masked_names()
    # LiDAR is exact geometry: its distance counts unless the model's is more than `margin` nearer (the
    # model then sees what LiDAR cannot, e.g. a red light's stop line; a metre of the model's own distance
    # error on the LiDAR's obstacle is not evidence).
    distance, source = a.distance, "model"
    if lidar_free_distance is not None and not a.distance < lidar_free_distance - cfg.margin:
        distance, source = lidar_free_distance, "lidar"
    ttc = a.ttc
    # The measured TTC: from the LiDAR's obstacle when there is LiDAR (the model's distance enters only
    # through its own TTC head), from the model's distance without it.
    measured = distance if lidar_free_distance is None else lidar_free_distance
    lead_speed = 0.0  # the obstacle's own speed: 0 (it may stand still) unless measured
    if math.isfinite(measured):
        if lidar_free_distance is not None and closing is not None:
            ttc = min(ttc, measured / closing if closing > 0.1 else math.inf)
            if ego_speed is not None and source == "lidar":
                lead_speed = max(0.0, min(ego_speed, ego_speed - closing))
        elif ego_speed is not None and ego_speed > 0.1:
            ttc = min(ttc, measured / ego_speed)  # closing speed not measured: as if the obstacle stood still

    degrade = cfg.degraded_factor ** len(masked)
    reasons: list[str] = []
    notes: list[str] = []
    action, speed = a.action, a.target_speed
    side = LANE_CHANGE_SIDE.get(action, 0)

    if ttc < cfg.ttc_stop:
        action, speed = Action.STOP, 0.0
        reasons.append(f"TTC < {cfg.ttc_stop:g} s")
    else:
        cap = cfg.max_speed
        if side:
            lane = check_lane(lanes, side, distance, cfg, vehicle)
            if lane.free:
                # Rule 3: the vehicle leaves the ego lane; the target lane's free distance caps the speed.
                cap = stopping_speed_cap(lane.room, cfg) * degrade
                notes.append(lane.reason)
            else:
                reasons.append(lane.reason)
                side = 0
                if math.isfinite(distance) and distance <= cfg.max_range:
                    # Without GNSS nothing says how fast we are: the stopping distance at max_speed.
                    v = cfg.max_speed if ego_speed is None else ego_speed
                    if distance <= comfortable_stop_distance(v, cfg) + cfg.blocked_stop_margin:
                        action, speed = Action.STOP, 0.0
                    else:
                        action = Action.SLOW_DOWN
                        room = distance - cfg.blocked_stop_margin
                        speed = min(speed, math.sqrt(2.0 * cfg.comfort_decel * max(room, 0.0)))
                else:
                    action = Action.KEEP_LANE
        if not side:  # rules 1 and 2 in the ego lane
            cap = stopping_speed_cap(distance, cfg, lead_speed) * degrade
            if lidar_free_distance is None:
                cap = min(cap, cfg.no_lidar_speed)
            if ttc < cfg.ttc_slow and action in (Action.KEEP_LANE, Action.FOLLOW):
                action = Action.SLOW_DOWN
                reasons.append(f"TTC < {cfg.ttc_slow:g} s")
            if ttc < cfg.ttc_slow and ego_speed is not None:
                cap = min(cap, cfg.slow_factor * ego_speed)
        if speed > cap:
            speed = cap
            reasons.append(f"speed capped to {cap:.1f} m/s" + (" (degraded)" if masked else ""))
        if not side and speed < cfg.stop_speed and cap < cfg.stop_speed and action != Action.STOP:
            action, speed = Action.STOP, 0.0
            reasons.append("inside stopping distance")

    override = action != a.action or speed < a.target_speed - 1e-6
    text = describe(action, distance, ttc, source, masked)
    if notes:
        text += f", {', '.join(notes)}"
    if override:
        text += f" [guard: {'; '.join(reasons)}]"
    confidence = a.confidence
    if action != a.action:
        # Confidence stays "the model's probability of the chosen action", reduced when masked.
        confidence = float(a.action_probs[action]) * MASKED_CONFIDENCE_FACTOR ** len(masked)
    return replace(a, action=action, target_speed=float(speed), ttc=ttc, distance=distance,
                   safety_override=override, rationale=text, confidence=confidence,
                   lidar_free_distance=math.inf if lidar_free_distance is None else lidar_free_distance,
                   ego_speed=ego_speed)
