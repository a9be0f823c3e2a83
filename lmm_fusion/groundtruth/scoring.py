"""Per-sample accuracy of an :class:`~lmm_fusion.cycle.assessment.Assessment` against recorded ground truth.

Small, ROS-free API shared by offline replay (and usable by ``lmm-fusion eval``):

* :func:`ground_truth_from_messages` turns the latest ``/ground_truth/*`` messages of a cycle into a
  :class:`GroundTruth` (numpy, enums, floats).
* :func:`score` compares one assessment with one ground truth -> :class:`SampleScore`.
* :func:`accuracy_table` aggregates scores; :func:`grouped_tables` does so per key (scenario family,
  time window).

Metric definitions (units: m/s, s, m):

* ``action_accuracy``, ``risk_accuracy``, ``light_accuracy``: fraction of samples whose class equals
  the ground truth (the guarded action; ``model_action_accuracy`` scores the network's own).
* ``target_speed_mae``: mean |suggested target speed - ground-truth target speed| [m/s].
* ``ttc_mae`` / ``distance_mae``: mean absolute error with "none"/"free" (+inf) on either side taken at
  the cap (``TTC_CAP`` [s], ``DISTANCE_CAP`` [m]) — the same convention as ``lmm-fusion eval``, whose
  labels are capped the same way.
* ``occupancy_iou``: intersection over union of predicted (p > 0.5) and true (> 50) occupied cells,
  summed over all samples (micro average; a sample with an empty union adds nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm_fusion.base import topics as T
from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.vocabulary import Action, Light, Risk
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.io.errors import MessageError

#: Caps applied to +inf ("none"/"free") before taking absolute errors, matching the model's caps.
TTC_CAP = 10.0
DISTANCE_CAP = 50.0
#: Probability at which a predicted occupancy cell counts as occupied.
OCCUPIED_PROBABILITY = 0.5


@dataclass(frozen=True)
class GroundTruth:
    """Labels of one LiDAR frame. ``stamp`` [s]; any field may be None when its topic is absent.

    ``occupancy``: (ny, nx) float32 in [0, 1] (1 = occupied) on the grid of the message, or None.
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


@dataclass(frozen=True)
class SampleScore:
    """Errors of one assessment against one ground truth; None where the label is missing.

    ``ttc_error``/``distance_error`` [s]/[m] are capped absolute errors (see the module docstring).
    ``occ_intersection``/``occ_union`` are cell counts.
    """

    t: float
    scenario: str | None
    action_ok: bool | None
    model_action_ok: bool | None
    risk_ok: bool | None
    light_ok: bool | None
    speed_error: float | None
    ttc_error: float | None
    distance_error: float | None
    occ_intersection: int | None
    occ_union: int | None


def _capped_abs_error(pred: float, true: float | None, cap: float) -> float | None:
    if true is None:
        return None
    return abs(min(pred, cap) - min(true, cap))  # min(inf, cap) == cap


def score(
    a: Assessment,
    gt: GroundTruth,
    t: float | None = None,
    ttc_cap: float = TTC_CAP,
    distance_cap: float = DISTANCE_CAP,
) -> SampleScore:
    """Compare one assessment with its ground truth (an invalid assessment is scored as it is:
    its STOP at 0 m/s and empty occupancy count against it)."""
    inter = union = None
    if gt.occupancy is not None:
        true_occ = gt.occupancy > 0.5
        pred = (
            a.occupancy
            if a.valid and a.occupancy is not None and a.occupancy.shape == true_occ.shape
            else None
        )
        pred_occ = pred > OCCUPIED_PROBABILITY if pred is not None else np.zeros_like(true_occ)
        inter = int(np.count_nonzero(pred_occ & true_occ))
        union = int(np.count_nonzero(pred_occ | true_occ))
    return SampleScore(
        t=a.stamp if t is None else t,
        scenario=gt.scenario,
        action_ok=None if gt.action is None else a.action == gt.action,
        model_action_ok=None if gt.action is None else a.model_action == gt.action,
        risk_ok=None if gt.risk is None else a.risk == gt.risk,
        light_ok=None if gt.light is None else a.light == gt.light,
        speed_error=None if gt.target_speed is None else abs(a.target_speed - gt.target_speed),
        ttc_error=_capped_abs_error(a.ttc, gt.ttc, ttc_cap),
        distance_error=_capped_abs_error(a.distance, gt.distance, distance_cap),
        occ_intersection=inter,
        occ_union=union,
    )


def _mean(values: Iterable[float | bool | None]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return round(sum(v) / len(v), 4) if v else None


def accuracy_table(samples: Iterable[SampleScore]) -> dict[str, float | int | None]:
    """Aggregate scores (see the module docstring); None where no sample had that label."""
    s = list(samples)
    inter = sum(x.occ_intersection or 0 for x in s)
    union = sum(x.occ_union or 0 for x in s)
    has_occ = any(x.occ_union is not None for x in s)
    return {
        "n": len(s),
        "action_accuracy": _mean(x.action_ok for x in s),
        "model_action_accuracy": _mean(x.model_action_ok for x in s),
        "risk_accuracy": _mean(x.risk_ok for x in s),
        "light_accuracy": _mean(x.light_ok for x in s),
        "target_speed_mae": _mean(x.speed_error for x in s),
        "ttc_mae": _mean(x.ttc_error for x in s),
        "distance_mae": _mean(x.distance_error for x in s),
        "occupancy_iou": (round(inter / union, 4) if union else None) if has_occ else None,
    }


def grouped_tables(
    samples: Iterable[SampleScore], key: Callable[[SampleScore], str | None]
) -> dict[str, dict[str, float | int | None]]:
    """:func:`accuracy_table` per group (``key`` -> group name; None = skipped), groups in sorted order."""
    groups: dict[str, list[SampleScore]] = {}
    for x in samples:
        k = key(x)
        if k is not None:
            groups.setdefault(k, []).append(x)
    return {k: accuracy_table(groups[k]) for k in sorted(groups)}


def window_key(t0: float, window_s: float) -> Callable[[SampleScore], str]:
    """Group key "start-end" [s since ``t0``] for fixed windows of ``window_s`` seconds (zero-padded so
    the keys sort in time order)."""
    if not window_s > 0:
        raise ValueError(f"window_s: must be > 0, got {window_s}")

    def key(x: SampleScore) -> str:
        i = int((x.t - t0) // window_s)
        return f"{i * window_s:06.1f}-{(i + 1) * window_s:06.1f}"

    return key


__all__ = [
    "DISTANCE_CAP",
    "TTC_CAP",
    "GroundTruth",
    "SampleScore",
    "accuracy_table",
    "ground_truth_from_messages",
    "grouped_tables",
    "occupancy_from_msg",
    "score",
    "window_key",
]
