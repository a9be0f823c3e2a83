"""The result of one fusion cycle and the decoding of raw model outputs into it.

:class:`Assessment` is what every front end (node, replay, CARLA bridge, benchmark) gets from
:meth:`lmm_fusion.cycle.pipeline.FusionPipeline.cycle`; :mod:`lmm_fusion.ros.outputs` turns it into ROS
messages and :meth:`Assessment.to_dict` into JSON. Units: metres, seconds, m/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmm_fusion.base.vocabulary import MODALITIES, Action, Light, Risk

#: Confidence multiplier per masked modality (a suggestion made half-blind is less certain).
MASKED_CONFIDENCE_FACTOR = 0.75
#: With a modality masked, the reported risk is the highest level whose upper-tail probability
#: P(risk >= level) reaches the masked modality's threshold (the lowest one when several are masked),
#: not the most probable level. Why: a half-blind model's risk errors should fall on the cautious
#: side. On held-out drives with the LiDAR masked, arg-max errs as often low as high, while 0.4 trades
#: ~1-1.5 points of risk accuracy for errors that are mostly high. The camera's threshold is lower:
#: it is the one sensor that sees signal lamps, brake lamps and turn signals, the evidence that raises
#: risk before any motion shows it, so without it the risk head is over-confident in LOW. Chosen on
#: the lamp-cue validation drives (seed 7100), where 0.4 still erred low (under 0.049 vs over 0.036)
#: and 0.2 errs high (0.040 vs 0.052) for 0.8 points of risk accuracy.
DEGRADED_RISK_TAIL: dict[str, float] = {"camera": 0.2, "lidar": 0.4, "gnss": 0.4}


def decide_risk(risk_probs: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Risk level(s) from ``risk_probs (..., 3)`` and the modalities ``used (..., 3)`` (bool, in
    :data:`~lmm_fusion.base.vocabulary.MODALITIES` order; broadcast over the leading dimensions): the arg-max
    when every sensor is used, else the cautious level of :data:`DEGRADED_RISK_TAIL`.
    Returns int64 of shape ``(...)``."""
    p = np.asarray(risk_probs, np.float64)
    used = np.asarray(used, bool)
    thresholds = np.array([DEGRADED_RISK_TAIL[m] for m in MODALITIES])
    threshold = np.where(used, np.inf, thresholds).min(-1)  # +inf where nothing is masked
    tail = np.cumsum(p[..., ::-1], axis=-1)[..., ::-1]  # P(risk >= level); non-increasing in level
    cautious = np.maximum((tail >= threshold[..., None]).sum(-1) - 1, 0)
    return np.where(used.all(-1), p.argmax(-1), cautious).astype(np.int64)


@dataclass(frozen=True)
class ModalityState:
    """Status of one input modality in one cycle.

    ``age`` [s] is the age of its latest frame at the cycle time (+inf when never received);
    ``attention`` is its share of the fusion attention in [0, 1] (0 when masked); ``reason`` says why
    it was not used ("" when used), e.g. "stale (0.83 s old > 0.5 s)", "no transform from 'os_lidar' to
    base_link", "no motion estimate yet: waiting for fixes (2 of 3)".
    """

    name: str
    used: bool
    age: float
    attention: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Assessment:
    """Scene assessment + action suggestion of one cycle (after the safety guard).

    Probabilities are float32 arrays indexed by the enum values: ``risk_probs (3,)``,
    ``light_probs (4,)``, ``action_probs (6,)``. ``ttc`` [s] and ``distance`` [m, from the front
    bumper] are +inf when nothing is closing / the lane is free. ``occupancy`` is a float32 (ny, nx)
    probability grid on :data:`lmm_fusion.base.grid.OCCUPANCY_GRID` or None (invalid cycle).
    ``latency_ms`` maps stage name -> milliseconds. ``model_action`` / ``model_target_speed`` keep the
    network's own suggestion before the guard; ``lidar_free_distance`` [m] is the guard's raw LiDAR
    measurement (+inf when free or LiDAR masked); ``ego_speed`` [m/s] is the speed the guard used (None
    without one) and ``ego_speed_source`` where it came from: ``"odometry"`` (the vehicle's own, preferred
    while fresh), ``"gnss"`` (the fix sequence's motion estimate) or ``""``.
    """

    stamp: float
    valid: bool
    modalities: tuple[ModalityState, ...]
    risk: Risk = Risk.LOW
    risk_probs: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    ttc: float = math.inf
    distance: float = math.inf
    light: Light = Light.NONE
    light_probs: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    action: Action = Action.STOP
    action_probs: np.ndarray = field(default_factory=lambda: np.zeros(6, np.float32))
    target_speed: float = 0.0
    confidence: float = 0.0
    safety_override: bool = False
    rationale: str = "no assessment"
    occupancy: np.ndarray | None = None
    model_action: Action = Action.STOP
    model_target_speed: float = 0.0
    lidar_free_distance: float = math.inf
    ego_speed: float | None = None
    ego_speed_source: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        """True when at least one modality was masked out."""
        return not all(m.used for m in self.modalities)

    @property
    def mask(self) -> np.ndarray:
        """(3,) bool in MODALITIES order, True = used."""
        return np.array([m.used for m in self.modalities], dtype=bool)

    def masked_names(self) -> list[str]:
        return [m.name for m in self.modalities if not m.used]

    def masked_reasons(self) -> dict[str, str]:
        """``{name: why}`` of every masked modality ("unknown" where no reason was recorded)."""
        return {m.name: m.reason or "unknown" for m in self.modalities if not m.used}

    def with_latency(self, **stages_ms: float) -> Assessment:
        """Copy with ``latency_ms`` extended by the given stages [ms]."""
        return replace(self, latency_ms={**self.latency_ms, **stages_ms})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no occupancy grid; inf written as None)."""

        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 4)

        return {
            "stamp": self.stamp,
            "valid": self.valid,
            "degraded": self.degraded,
            "risk": self.risk.name,
            "risk_probs": [round(float(p), 4) for p in self.risk_probs],
            "ttc": num(self.ttc),
            "distance": num(self.distance),
            "light": self.light.name,
            "action": self.action.name,
            "action_probs": [round(float(p), 4) for p in self.action_probs],
            "target_speed": num(self.target_speed),
            "confidence": num(self.confidence),
            "safety_override": self.safety_override,
            "rationale": self.rationale,
            "model_action": self.model_action.name,
            "model_target_speed": num(self.model_target_speed),
            "lidar_free_distance": num(self.lidar_free_distance),
            "ego_speed": num(self.ego_speed),
            "ego_speed_source": self.ego_speed_source,
            "modalities": [{"name": m.name, "used": m.used, "age": num(m.age), "attention": num(m.attention),
                            "reason": m.reason} for m in self.modalities],
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
        }


def modality_states(mask: np.ndarray, ages: dict[str, float], attention: np.ndarray | None = None,
                    reasons: dict[str, str] | None = None) -> tuple[ModalityState, ...]:
    """Per-modality states from a (3,) bool mask, ages [s] by name, optional (3,) attention shares and
    the reasons [by name] of the masked ones.

    Masked modalities get attention 0 and the remaining shares are renormalised to sum to 1.
    """
    reasons = reasons or {}
    mask = np.asarray(mask, dtype=bool).reshape(len(MODALITIES))
    att = np.zeros(len(MODALITIES), np.float64)
    if attention is not None:
        att = np.clip(np.asarray(attention, np.float64).reshape(len(MODALITIES)), 0.0, None)
        att = np.where(mask, att, 0.0)
        total = att.sum()
        att = att / total if total > 0 else np.where(mask, 1.0 / max(int(mask.sum()), 1), 0.0)
    return tuple(ModalityState(name, bool(mask[i]), float(ages.get(name, math.inf)), float(att[i]),
                               "" if mask[i] else reasons.get(name, ""))
                 for i, name in enumerate(MODALITIES))


def invalid(stamp: float, mask: np.ndarray, ages: dict[str, float],
            reasons: dict[str, str] | None = None) -> Assessment:
    """The "no assessment" result: no modality usable, stop suggested, everything else meaningless;
    ``reasons`` [by modality name]: why each is masked."""
    return Assessment(stamp=stamp, valid=False, modalities=modality_states(mask, ages, reasons=reasons),
                      rationale="no assessment: no sensor data")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64).reshape(-1)
    z = z - z.max()
    e = np.exp(z)
    return (e / e.sum()).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -60, 60)))).astype(np.float32)


def _scalar(outputs: dict[str, np.ndarray], name: str) -> float:
    return float(np.asarray(outputs[name]).reshape(-1)[0])


def decode(outputs: dict[str, np.ndarray], stamp: float, mask: np.ndarray, ages: dict[str, float],
           ttc_max: float, distance_max: float, reasons: dict[str, str] | None = None) -> Assessment:
    """Decode batch-1 model outputs (``lmm_fusion.model.OUTPUT_NAMES``) into an Assessment.

    ``ttc`` >= ``ttc_max`` [s] means "none" and ``obstacle_distance`` >= ``distance_max`` [m] means
    "free"; both become +inf. The risk follows :func:`decide_risk` (cautious when a modality is
    masked). The action is the arg-max; its probability, reduced by
    :data:`MASKED_CONFIDENCE_FACTOR` per masked modality, is the confidence. The rationale is the
    model's; :func:`lmm_fusion.cycle.safety.apply_guard` rewrites it. ``reasons``: why each masked
    modality is masked (:attr:`ModalityState.reason`).
    """
    mask = np.asarray(mask, dtype=bool)
    risk_p = _softmax(outputs["risk_logits"])
    light_p = _softmax(outputs["light_logits"])
    action_p = _softmax(outputs["action_logits"])
    ttc = _scalar(outputs, "ttc")
    dist = _scalar(outputs, "obstacle_distance")
    ttc = math.inf if not math.isfinite(ttc) or ttc >= ttc_max * 0.99 else max(ttc, 0.0)
    dist = math.inf if not math.isfinite(dist) or dist >= distance_max * 0.99 else max(dist, 0.0)
    speed = _scalar(outputs, "target_speed")
    speed = max(speed, 0.0) if math.isfinite(speed) else 0.0
    action = Action(int(np.argmax(action_p)))
    n_masked = int((~mask).sum())
    confidence = float(action_p[action]) * MASKED_CONFIDENCE_FACTOR ** n_masked
    occ = _sigmoid(np.asarray(outputs["occupancy_logits"])[0] if np.ndim(outputs["occupancy_logits"]) == 3
                   else outputs["occupancy_logits"])
    attention = np.asarray(outputs.get("modality_attention", np.ones((1, 3)))).reshape(-1)
    return Assessment(
        stamp=stamp, valid=True, modalities=modality_states(mask, ages, attention, reasons),
        risk=Risk(int(decide_risk(risk_p, mask))), risk_probs=risk_p, ttc=ttc, distance=dist,
        light=Light(int(np.argmax(light_p))), light_probs=light_p, action=action, action_probs=action_p,
        target_speed=speed, confidence=confidence, occupancy=occ, model_action=action,
        model_target_speed=speed, rationale=action.name.lower().replace("_", " "),
    )
