"""The one scorer: predictions against ground truth -> accuracy tables, for every front end.

Array core: :class:`Columns` holds (N,) arrays of predictions and labels; :func:`score_arrays` turns
them into one table (every metric below) and :func:`score_groups` into one table per group (scenario
family, time window, ...). Front ends only build columns and pick the keys they report:

* ``lmm-fusion eval`` (:mod:`lmm_fusion.training.evaluate`): the model's outputs over a dataset, and
  the quick metrics of the training logs;
* offline replay (:mod:`lmm_fusion.offline.replay`): :func:`sample_of` pairs each cycle's
  :class:`~lmm_fusion.cycle.assessment.Assessment` with its :class:`GroundTruth`, and
  :func:`accuracy_table` / :func:`grouped_tables` score those records (rounded to 4 decimals);
* ``lmm-fusion demo`` (:func:`lmm_fusion.tools.demo.summarise`): the node's outputs received over DDS.

Metric definitions (units: m/s, s, m); a metric is None when no sample has its label (or the front end
gave no such prediction):

* ``action_accuracy``, ``risk_accuracy``, ``light_accuracy``: fraction of labelled samples whose
  predicted class equals the label; ``model_action_accuracy`` scores ``pred["model_action"]`` (the
  network's own suggestion, before the safety guard) against the action label.
* ``risk_under_rate`` / ``risk_over_rate``: fraction of risk-labelled samples whose predicted level is
  below / above the label. ``risk_macro_f1``: :func:`macro_f1` over the risk levels.
* ``action_unsafe_rate`` / ``action_over_cautious_rate``: fraction of action-labelled samples whose
  suggested action is less / more cautious than the label's on the scale of :data:`CAUTION`
  (keep lane = change lane < follow < slow down < stop; :func:`caution_rates`). ``model_action_*``: the
  same three metrics for ``pred["model_action"]``. An action that differs from the label but has the
  same caution (keep lane where the label changes lane) is neither: it lowers only the accuracy.
* ``target_speed_mae``, ``ttc_mae``, ``distance_mae``: mean |min(pred, cap) - min(label, cap)| with the
  caps of :class:`Caps`: +inf ("none" closing, lane "free") on either side counts at the cap, so a
  missed obstacle is penalised by its distance to the cap.
* ``occupancy_iou``: summed intersections over summed unions (micro average) of occupied cells,
  predicted against true (:func:`occupancy_overlap`; a sample with an empty union adds nothing).

Also here, for the calibration and confusion figures of ``lmm-fusion eval``: :func:`ece`, :func:`confusion`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.groundtruth.messages import GroundTruth

#: Caps applied to +inf ("none"/"free") before taking absolute errors, matching the model's caps.
TTC_CAP = 10.0
DISTANCE_CAP = 50.0
#: Probability above which a predicted occupancy cell counts as occupied.
OCCUPIED_PROBABILITY = 0.5
#: Class fields (int codes; a label < 0 marks a sample without it) and value fields (float; a NaN label
#: marks a sample without it) of :class:`Columns`.
CLASS_FIELDS: tuple[str, ...] = ("action", "risk", "light")
VALUE_FIELDS: tuple[str, ...] = ("target_speed", "ttc", "distance")
#: The class code of a missing label.
NO_LABEL = -1
#: How cautious each action is (higher = more cautious): the scale of the unsafe and over-cautious rates.
#: Keeping and changing lanes share the lowest level: both drive on at speed, one in another lane.
CAUTION: dict[Action, int] = {Action.KEEP_LANE: 0, Action.CHANGE_LANE_LEFT: 0, Action.CHANGE_LANE_RIGHT: 0,
                              Action.FOLLOW: 1, Action.SLOW_DOWN: 2, Action.STOP: 3}
#: The action metrics of :func:`score_arrays` (for the guarded ``action`` and the network's ``model_action``).
ACTION_KEYS: tuple[str, ...] = (
    "action_accuracy", "action_unsafe_rate", "action_over_cautious_rate",
    "model_action_accuracy", "model_action_unsafe_rate", "model_action_over_cautious_rate",
)
#: Keys of :func:`score_arrays`, in order.
TABLE_KEYS: tuple[str, ...] = (
    "n", *ACTION_KEYS, "risk_accuracy", "risk_under_rate", "risk_over_rate",
    "risk_macro_f1", "light_accuracy", "target_speed_mae", "ttc_mae", "distance_mae", "occupancy_iou",
)
#: Keys of the per-record tables (:func:`accuracy_table`, :func:`grouped_tables`), in order.
RECORD_KEYS: tuple[str, ...] = (
    "n", *ACTION_KEYS, "risk_accuracy", "light_accuracy", "target_speed_mae",
    "ttc_mae", "distance_mae", "occupancy_iou",
)

#: Bins of the expected calibration error (:func:`ece`).
ECE_BINS = 15

Table = dict[str, Any]


@dataclass(frozen=True)
class Caps:
    """Values at which predictions and labels are capped before absolute errors are taken: target
    speed [m/s], TTC [s], distance [m] (``math.inf`` = not capped)."""

    target_speed: float = math.inf
    ttc: float = TTC_CAP
    distance: float = DISTANCE_CAP


#: The caps of replay and every per-record front end.
DEFAULT_CAPS = Caps()
#: No caps: for values that already lie within them (``lmm-fusion eval``'s labels are capped when the
#: samples are extracted and the model's heads cannot exceed the same caps).
UNCAPPED = Caps(math.inf, math.inf, math.inf)


# ------------------------------------------------------------------------------------ metric functions
def _labelled(pred: np.ndarray | None, true: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(pred, true) of the samples that have the label (class code >= 0, value not NaN); None when
    either side is not given."""
    if pred is None or true is None:
        return None
    true = np.asarray(true)
    sel = ~np.isnan(true) if np.issubdtype(true.dtype, np.floating) else true >= 0
    return np.asarray(pred)[sel], true[sel]


def accuracy(pred: np.ndarray | None, true: np.ndarray | None) -> float | None:
    """Fraction of labelled samples with ``pred == true`` (class codes)."""
    pt = _labelled(pred, true)
    if pt is None or not len(pt[1]):
        return None
    return float((pt[0] == pt[1]).mean())


def under_over_rates(pred: np.ndarray | None, true: np.ndarray | None) -> tuple[float | None, float | None]:
    """Fractions of labelled samples with ``pred < true`` and ``pred > true`` (ordered codes: risk)."""
    pt = _labelled(pred, true)
    if pt is None or not len(pt[1]):
        return None, None
    p, t = pt
    return float((p < t).mean()), float((p > t).mean())


def caution_rates(pred: np.ndarray | None, true: np.ndarray | None) -> tuple[float | None, float | None]:
    """``(unsafe, over_cautious)``: fractions of action-labelled samples whose predicted action is less /
    more cautious than the label on the :data:`CAUTION` scale (action codes; label < 0 = no label)."""
    pt = _labelled(pred, true)
    if pt is None or not len(pt[1]):
        return None, None
    p, t = (np.asarray(x, np.int64) for x in pt)
    for name, codes in (("pred", p), ("true", t)):
        if codes.size and (codes.min() < 0 or codes.max() >= len(Action)):
            raise ValueError(f"caution_rates: {name} holds an action code outside 0..{len(Action) - 1}")
    return under_over_rates(caution_levels(p), caution_levels(t))


def caution_levels(actions: np.ndarray) -> np.ndarray:
    """Action codes ``(N,)`` -> their :data:`CAUTION` levels ``(N,)`` int64; a code < 0 (no label) stays
    :data:`NO_LABEL`."""
    rank = np.zeros(len(Action), np.int64)
    for action, level in CAUTION.items():
        rank[int(action)] = level
    a = np.asarray(actions, np.int64)
    return np.where(a >= 0, rank[np.clip(a, 0, len(Action) - 1)], NO_LABEL)


def macro_f1(true: np.ndarray, pred: np.ndarray, n_classes: int) -> float | None:
    """Mean F1 over the classes that occur in ``true`` or ``pred``; None when none does."""
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else None


def mae(pred: np.ndarray | None, true: np.ndarray | None, cap: float = math.inf) -> float | None:
    """Mean |min(pred, cap) - min(true, cap)| over the labelled samples (computed in the arrays' dtype)."""
    pt = _labelled(pred, true)
    if pt is None or not len(pt[1]):
        return None
    p, t = pt
    if cap < math.inf:  # min(inf, cap) == cap: "none"/"free" counts at the cap
        p, t = np.minimum(p, cap), np.minimum(t, cap)
    return float(np.abs(p - t).mean())


def occupancy_overlap(pred_occupied: np.ndarray, true_occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union cell counts of occupied grids ``(..., ny, nx)`` bool -> two ``(...)`` int arrays."""
    p, t = np.asarray(pred_occupied, bool), np.asarray(true_occupied, bool)
    return np.count_nonzero(p & t, axis=(-2, -1)), np.count_nonzero(p | t, axis=(-2, -1))


def iou(inter: np.ndarray | None, union: np.ndarray | None) -> float | None:
    """Summed intersections / summed unions (micro average) over the samples with an occupancy label
    (union >= 0); None without such samples or when every union is empty."""
    if inter is None or union is None:
        return None
    union = np.asarray(union)
    sel = union >= 0
    if not sel.any():
        return None
    u = float(union[sel].sum())
    return float(np.asarray(inter)[sel].sum()) / u if u > 0 else None


def ece(prob: np.ndarray, true: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of the top-class confidence (equal-width bins); None for no samples.

    ``prob (N, C)`` class probabilities, ``true (N,)`` class codes."""
    if len(true) == 0:
        return None
    conf = prob.max(1)
    correct = (prob.argmax(1) == true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def confusion(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` counts, row = true class, column = predicted class."""
    return np.bincount(true * n + pred, minlength=n * n).reshape(n, n)


# ---------------------------------------------------------------------------------------- array core
@dataclass(frozen=True)
class Columns:
    """Predictions and labels of N samples: the scorer's input.

    ``pred`` / ``true``: (N,) arrays by field name, :data:`CLASS_FIELDS` as int codes and
    :data:`VALUE_FIELDS` as floats; a label < 0 (class) or NaN (value) marks a sample without it, and a
    field absent from either side is not scored. ``pred["model_action"]`` is scored against
    ``true["action"]``. ``occ_inter`` / ``occ_union``: (N,) occupied-cell counts
    (:func:`occupancy_overlap`), -1 for a sample without an occupancy label; None = not scored.
    """

    pred: Mapping[str, np.ndarray]
    true: Mapping[str, np.ndarray]
    occ_inter: np.ndarray | None = None
    occ_union: np.ndarray | None = None
    n: int = field(init=False)

    def __post_init__(self) -> None:
        arrays = {f"pred[{k!r}]": v for k, v in self.pred.items()} | {f"true[{k!r}]": v for k, v in self.true.items()}
        if self.occ_inter is not None:
            arrays["occ_inter"] = self.occ_inter
        if self.occ_union is not None:
            arrays["occ_union"] = self.occ_union
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns: arrays of different lengths {sizes}")
        object.__setattr__(self, "n", next(iter(sizes.values()), 0))

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> Columns:
        """The samples at ``idx`` (integer indices or a boolean mask), in that order."""
        return Columns(
            {k: v[idx] for k, v in self.pred.items()}, {k: v[idx] for k, v in self.true.items()},
            None if self.occ_inter is None else self.occ_inter[idx],
            None if self.occ_union is None else self.occ_union[idx],
        )


def score_arrays(cols: Columns, caps: Caps = DEFAULT_CAPS) -> Table:
    """Every metric of the module docstring over ``cols`` (keys :data:`TABLE_KEYS`; floats unrounded)."""
    p, t = cols.pred, cols.true
    under, over = under_over_rates(p.get("risk"), t.get("risk"))
    risk = _labelled(p.get("risk"), t.get("risk"))
    unsafe, over_cautious = caution_rates(p.get("action"), t.get("action"))
    model_unsafe, model_over_cautious = caution_rates(p.get("model_action"), t.get("action"))
    return {
        "n": len(cols),
        "action_accuracy": accuracy(p.get("action"), t.get("action")),
        "action_unsafe_rate": unsafe,
        "action_over_cautious_rate": over_cautious,
        "model_action_accuracy": accuracy(p.get("model_action"), t.get("action")),
        "model_action_unsafe_rate": model_unsafe,
        "model_action_over_cautious_rate": model_over_cautious,
        "risk_accuracy": accuracy(p.get("risk"), t.get("risk")),
        "risk_under_rate": under,
        "risk_over_rate": over,
        "risk_macro_f1": None if risk is None else macro_f1(risk[1], risk[0], len(Risk)),
        "light_accuracy": accuracy(p.get("light"), t.get("light")),
        "target_speed_mae": mae(p.get("target_speed"), t.get("target_speed"), caps.target_speed),
        "ttc_mae": mae(p.get("ttc"), t.get("ttc"), caps.ttc),
        "distance_mae": mae(p.get("distance"), t.get("distance"), caps.distance),
        "occupancy_iou": iou(cols.occ_inter, cols.occ_union),
    }


def group_indices(keys: Sequence[Any] | np.ndarray) -> dict[Any, np.ndarray]:
    """Sample indices per group key (a key of None = the sample is in no group), keys in sorted order."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys.tolist() if isinstance(keys, np.ndarray) else keys):
        if k is not None:
            groups.setdefault(k, []).append(i)
    return {k: np.asarray(groups[k], np.intp) for k in sorted(groups)}


def score_groups(cols: Columns, keys: Sequence[Any] | np.ndarray, caps: Caps = DEFAULT_CAPS) -> dict[Any, Table]:
    """:func:`score_arrays` per group of samples (``keys``: one per sample, see :func:`group_indices`)."""
    return {k: score_arrays(cols.take(idx), caps) for k, idx in group_indices(keys).items()}


# ------------------------------------------------------------------------------- per-record front end
@dataclass(frozen=True)
class Sample:
    """One record to score: predicted and true values by field (:class:`Columns` names; a missing
    label is absent from ``true``) at time ``t`` [s] in scenario family ``scenario``.
    ``occupancy``: (intersection, union) cell counts, None without an occupancy label."""

    t: float
    scenario: str | None
    pred: Mapping[str, float]
    true: Mapping[str, float]
    occupancy: tuple[int, int] | None = None


def sample_of(a: Assessment, gt: GroundTruth, t: float | None = None) -> Sample:
    """Pair one assessment with its ground truth (at ``t`` [s], default the assessment's stamp).

    An invalid assessment is scored as it is: its STOP at 0 m/s and empty occupancy count against it.
    """
    occ = None
    true_occ = gt.occupied
    if true_occ is not None:
        pred = (
            a.occupancy
            if a.valid and a.occupancy is not None and a.occupancy.shape == true_occ.shape
            else None
        )
        pred_occ = pred > OCCUPIED_PROBABILITY if pred is not None else np.zeros_like(true_occ)
        inter, union = occupancy_overlap(pred_occ, true_occ)
        occ = (int(inter), int(union))
    labels = {"action": gt.action, "risk": gt.risk, "light": gt.light, "target_speed": gt.target_speed,
              "ttc": gt.ttc, "distance": gt.distance}
    return Sample(
        t=a.stamp if t is None else t,
        scenario=gt.scenario,
        pred={"action": int(a.action), "model_action": int(a.model_action), "risk": int(a.risk),
              "light": int(a.light), "target_speed": float(a.target_speed), "ttc": float(a.ttc),
              "distance": float(a.distance)},
        true={k: int(v) if k in CLASS_FIELDS else float(v) for k, v in labels.items() if v is not None},
        occupancy=occ,
    )


def columns_of(samples: Sequence[Sample]) -> Columns:
    """The records as :class:`Columns` (missing labels as :data:`NO_LABEL` / NaN)."""

    def column(side: str, name: str) -> np.ndarray:
        cls = name in (*CLASS_FIELDS, "model_action")
        missing = NO_LABEL if cls else math.nan
        values = [getattr(s, side).get(name, missing) for s in samples]
        return np.asarray(values, np.int64) if cls else np.asarray(values, np.float64)

    occ = [s.occupancy or (-1, -1) for s in samples]
    return Columns(
        pred={k: column("pred", k) for k in (*CLASS_FIELDS, "model_action", *VALUE_FIELDS)},
        true={k: column("true", k) for k in (*CLASS_FIELDS, *VALUE_FIELDS)},
        occ_inter=np.asarray([i for i, _ in occ], np.int64),
        occ_union=np.asarray([u for _, u in occ], np.int64),
    )


def _record_table(table: Table) -> Table:
    """The per-record tables' keys, floats rounded to 4 decimals."""
    return {k: round(table[k], 4) if isinstance(table[k], float) else table[k] for k in RECORD_KEYS}


def accuracy_table(samples: Iterable[Sample], caps: Caps = DEFAULT_CAPS) -> Table:
    """Score records (keys :data:`RECORD_KEYS`, floats rounded to 4 decimals; None where no sample had
    that label)."""
    return _record_table(score_arrays(columns_of(list(samples)), caps))


def grouped_tables(
    samples: Iterable[Sample], key: Callable[[Sample], str | None], caps: Caps = DEFAULT_CAPS
) -> dict[str, Table]:
    """:func:`accuracy_table` per group (``key`` -> group name; None = skipped), groups in sorted order."""
    s = list(samples)
    return {k: _record_table(t) for k, t in score_groups(columns_of(s), [key(x) for x in s], caps).items()}


def window_key(t0: float, window_s: float) -> Callable[[Sample], str]:
    """Group key "start-end" [s since ``t0``] for fixed windows of ``window_s`` seconds (zero-padded so
    the keys sort in time order)."""
    if not window_s > 0:
        raise ValueError(f"window_s: must be > 0, got {window_s}")

    def key(x: Sample) -> str:
        i = int((x.t - t0) // window_s)
        return f"{i * window_s:06.1f}-{(i + 1) * window_s:06.1f}"

    return key


__all__ = [
    "ACTION_KEYS",
    "CAUTION",
    "CLASS_FIELDS",
    "DEFAULT_CAPS",
    "DISTANCE_CAP",
    "ECE_BINS",
    "NO_LABEL",
    "OCCUPIED_PROBABILITY",
    "RECORD_KEYS",
    "TABLE_KEYS",
    "TTC_CAP",
    "UNCAPPED",
    "VALUE_FIELDS",
    "Caps",
    "Columns",
    "Sample",
    "accuracy",
    "accuracy_table",
    "caution_levels",
    "caution_rates",
    "columns_of",
    "confusion",
    "ece",
    "group_indices",
    "grouped_tables",
    "iou",
    "macro_f1",
    "mae",
    "occupancy_overlap",
    "sample_of",
    "score_arrays",
    "score_groups",
    "under_over_rates",
    "window_key",
]
