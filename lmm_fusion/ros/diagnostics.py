"""Health tracking for the fusion node, published on ``/diagnostics`` (ROS-free).

Modelled on ``diagnostic_updater``'s ``FrequencyStatus`` (event rate in a sliding window against an
expected minimum) and ``TimeStampStatus`` (age of the latest header stamp against limits), which are
not installable here. Levels: OK, WARN, ERROR (``lmm_fusion.ros.outputs`` constants). All times are
node-clock seconds, so ``use_sim_time`` works.

Nothing is masked silently: a sensor's status carries the reason its modality was left out of the last
assessment (stale, a clock mismatch, no transform for its frame, no motion estimate yet, a rejected
jump), the ``ego_speed`` status says where the ego speed came from (odometry or GNSS) and why not the
other, and the assessment status lists each masked modality with its reason.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.cycle.sync import CLOCK_MISMATCH_S, stale_reason
from lmm_fusion.ros.outputs import ERROR, OK, WARN, StatusItem


@dataclass(frozen=True)
class DiagnosticsConfig:
    """``expected_hz``: nominal rate per sensor [Hz]; a measured rate below
    ``(1 - rate_tolerance) × expected`` is WARN, no message in ``window_s`` is ERROR. A latest frame
    older than ``warn_age`` [s] is WARN, older than ``error_age`` ERROR. The cycle deadline is the
    timer period."""

    expected_hz: Mapping[str, float] = field(
        default_factory=lambda: {"camera": 20.0, "lidar": 10.0, "gnss": 10.0})
    rate_tolerance: float = 0.5
    window_s: float = 2.0
    warn_age: float = 0.3
    error_age: float = 1.0
    rate_hz: float = 10.0
    latency_window: int = 200


class FrequencyTracker:
    """Event rate [Hz] over a sliding window of ``window_s`` seconds (like FrequencyStatus)."""

    def __init__(self, min_hz: float, window_s: float = 2.0) -> None:
        self.min_hz = min_hz
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, t: float) -> None:
        self._times.append(t)

    def _trim(self, now: float) -> None:
        while self._times and (self._times[0] <= now - self.window_s or self._times[0] > now + 1.0):
            self._times.popleft()

    def rate(self, now: float) -> float:
        """Events per second in ``(now - window_s, now]``."""
        self._trim(now)
        return len(self._times) / self.window_s

    def check(self, now: float) -> tuple[int, str]:
        r = self.rate(now)
        if r == 0.0:
            return ERROR, "no messages"
        if r < self.min_hz:
            return WARN, f"rate too low ({r:.1f} < {self.min_hz:.1f} Hz)"
        return OK, ""


def age_check(age: float, warn_age: float, error_age: float) -> tuple[int, str]:
    """TimeStampStatus-like check of a frame age [s] (negative = stamp in the future)."""
    if not math.isfinite(age):
        return ERROR, "never received"
    if age < -0.5:
        return ERROR, f"stamp {-age:.2f} s in the future"
    if age > CLOCK_MISMATCH_S:  # not late: on another clock (a bag without use_sim_time, a sensor clock)
        return ERROR, stale_reason(age, error_age)
    if age > error_age:
        return ERROR, f"stale ({age:.2f} s old)"
    if age > warn_age:
        return WARN, f"old ({age:.2f} s)"
    return OK, ""


def lifecycle_status(node_name: str, state: str) -> StatusItem:
    """The node's lifecycle state (``unconfigured``, ``inactive``, ``active``, ``finalized``): OK when
    active, WARN otherwise (the node is up but publishes no outputs)."""
    level, msg = (OK, "active") if state == "active" else (WARN, f"{state}: no outputs")
    return StatusItem(name=f"{node_name}: lifecycle", level=level, message=msg, hardware_id="fusion",
                      values={"state": state})


class FusionDiagnostics:
    """Per-sensor rate/age/rejections and per-cycle latency/deadline tracking."""

    def __init__(self, cfg: DiagnosticsConfig | None = None, node_name: str = "fusion_node") -> None:
        self.cfg = cfg or DiagnosticsConfig()
        self.node_name = node_name
        self.rates = {s: FrequencyTracker(self.cfg.expected_hz.get(s, 1.0) * (1 - self.cfg.rate_tolerance),
                                          self.cfg.window_s) for s in MODALITIES}
        self._rejected_total = dict.fromkeys((*MODALITIES, "odometry"), 0)
        self._rejected_times: dict[str, deque[float]] = {s: deque() for s in self._rejected_total}
        self.odometry_rate = FrequencyTracker(0.0, self.cfg.window_s)
        # (odometry age [s], why GNSS has no motion estimate, last odometry rejection) of the last cycle.
        self._ego: tuple[float, str, str] = (math.inf, "", "")
        self._latency_ms: deque[float] = deque(maxlen=self.cfg.latency_window)
        self._cycles = FrequencyTracker(self.cfg.rate_hz * (1 - self.cfg.rate_tolerance), self.cfg.window_s)
        self.cycles = 0
        self.deadline_misses = 0
        self._miss_times: deque[float] = deque()
        self._backend: tuple[str, str | None, bool] | None = None

    def set_backend(self, description: str, fallback_reason: str | None = None, failed: bool = False) -> None:
        """The backend the cycle runs on (``Backend.describe()``) and, when ``backend: auto`` did not get
        its first choice, why (``Backend.fallback_reason``); ``failed``: a preferred backend failed (an
        engine that did not parse, build, load or run) rather than being unavailable here: WARN."""
        self._backend = (description, fallback_reason, failed)

    def reconfigure(self, cfg: DiagnosticsConfig) -> None:
        """Use new limits and rates (a live parameter set), keeping what was measured so far."""
        self.cfg = cfg
        for s, tracker in self.rates.items():
            tracker.min_hz = cfg.expected_hz.get(s, 1.0) * (1 - cfg.rate_tolerance)
            tracker.window_s = cfg.window_s
        self._cycles.min_hz = cfg.rate_hz * (1 - cfg.rate_tolerance)
        self._cycles.window_s = cfg.window_s
        self.odometry_rate.window_s = cfg.window_s

    # ---------------------------------------------------------------- inputs
    def on_message(self, sensor: str, now: float) -> None:
        """A message of ``sensor`` arrived (accepted or not) at node time ``now`` [s]."""
        if sensor in self.rates:
            self.rates[sensor].tick(now)
        elif sensor == "odometry":
            self.odometry_rate.tick(now)

    def set_ego(self, odometry_age: float, gnss_reason: str = "", odometry_error: str = "") -> None:
        """The ego-speed inputs at the last cycle: odometry age [s] (inf = none received), why the GNSS
        estimate is not valid ("" when it is: ``SensorIngest.ego_reason``), the last odometry rejection."""
        self._ego = (float(odometry_age), gnss_reason, odometry_error)

    def set_rejected(self, sensor: str, total: int, now: float) -> None:
        """Update the running rejected count of ``sensor`` (from ``SensorIngest.stats.rejected``)."""
        if sensor not in self._rejected_total:
            return
        if total > self._rejected_total[sensor]:
            self._rejected_times[sensor].append(now)
        self._rejected_total[sensor] = total

    def on_cycle(self, now: float, latency_ms: float) -> None:
        """One cycle finished at ``now`` [s] after ``latency_ms`` of compute."""
        self.cycles += 1
        self._cycles.tick(now)
        self._latency_ms.append(latency_ms)
        if latency_ms > 1000.0 / self.cfg.rate_hz:
            self.deadline_misses += 1
            self._miss_times.append(now)

    # ---------------------------------------------------------------- outputs
    def latency_percentiles(self) -> tuple[float, float]:
        """(p50, p99) cycle latency [ms] over the last ``latency_window`` cycles (NaN when none)."""
        if not self._latency_ms:
            return math.nan, math.nan
        arr = np.fromiter(self._latency_ms, np.float64)
        return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))

    def _recent(self, times: deque[float], now: float) -> int:
        while times and times[0] <= now - self.cfg.window_s:
            times.popleft()
        return len(times)

    def statuses(self, now: float, ages: Mapping[str, float], assessment: Assessment | None = None
                 ) -> list[StatusItem]:
        """One status per sensor, one for the cycle, one for the backend (once :meth:`set_backend` was
        called) and one for the assessment."""
        out = []
        for s in MODALITIES:
            age = float(ages.get(s, math.inf))
            checks = [self.rates[s].check(now), age_check(age, self.cfg.warn_age, self.cfg.error_age)]
            recent_rej = self._recent(self._rejected_times[s], now)
            if recent_rej:
                checks.append((WARN, f"{recent_rej} rejected in {self.cfg.window_s:g} s"))
            masked = assessment.masked_reasons().get(s) if assessment is not None else None
            if masked is not None and not masked.startswith("stale"):  # the age check already says "stale"
                checks.append((WARN, f"masked: {masked}"))  # at least WARN: the model ran without it
            level = max(c[0] for c in checks)
            msg = "; ".join(c[1] for c in checks if c[1]) or "ok"
            out.append(StatusItem(
                name=f"{self.node_name}: {s}", level=level, message=msg, hardware_id=s,
                values={"rate_hz": f"{self.rates[s].rate(now):.2f}",
                        "expected_hz": f"{self.cfg.expected_hz.get(s, 0.0):.2f}",
                        "age_s": f"{age:.3f}" if math.isfinite(age) else "inf",
                        "rejected": str(self._rejected_total[s]), "masked_reason": masked or ""}))
        out.append(self._ego_status(now, assessment))
        p50, p99 = self.latency_percentiles()
        rate = self._cycles.rate(now)
        misses = self._recent(self._miss_times, now)
        level, msg = OK, "ok"
        if misses:
            level, msg = WARN, f"{misses} deadline misses in {self.cfg.window_s:g} s"
        if self.cycles and rate < self.cfg.rate_hz * (1 - self.cfg.rate_tolerance):
            level, msg = max(level, WARN), f"cycle rate {rate:.1f} Hz below {self.cfg.rate_hz:g} Hz"
        out.append(StatusItem(
            name=f"{self.node_name}: cycle", level=level, message=msg, hardware_id="fusion",
            values={"rate_hz": f"{rate:.2f}", "target_hz": f"{self.cfg.rate_hz:g}",
                    "latency_p50_ms": f"{p50:.2f}", "latency_p99_ms": f"{p99:.2f}",
                    "deadline_ms": f"{1000.0 / self.cfg.rate_hz:.1f}",
                    "deadline_misses": str(self.deadline_misses), "cycles": str(self.cycles)}))
        if self._backend is not None:
            description, reason, failed = self._backend
            out.append(StatusItem(
                name=f"{self.node_name}: backend", level=WARN if failed else OK,
                message=description + (f"; fell back: {reason}" if reason else ""), hardware_id="fusion",
                values={"backend": description, "fallback_reason": reason or ""}))
        if assessment is not None:
            if not assessment.valid:
                level, msg = ERROR, "no assessment: no sensor usable"
            elif assessment.degraded:
                why = "; ".join(f"{m} masked ({r})" for m, r in assessment.masked_reasons().items())
                level, msg = WARN, f"degraded: {why}"
            else:
                level, msg = OK, "all modalities used"
            values = {f"{k}_ms": f"{v:.2f}" for k, v in assessment.latency_ms.items()}
            values["safety_override"] = str(assessment.safety_override).lower()
            values["ego_speed_source"] = assessment.ego_speed_source
            out.append(StatusItem(name=f"{self.node_name}: assessment", level=level, message=msg,
                                  hardware_id="fusion", values=values))
        return out

    def _ego_status(self, now: float, assessment: Assessment | None) -> StatusItem:
        """Where the ego speed of the last cycle came from, and why not from the preferred odometry."""
        odo_age, gnss_reason, odo_error = self._ego
        source = assessment.ego_speed_source if assessment is not None else ""
        if math.isfinite(odo_age):
            odometry = f"odometry {odo_age:.2f} s old"
        else:
            odometry = "no odometry received" + (f" (rejected: {odo_error})" if odo_error else "")
        gnss = f"gnss: {gnss_reason}" if gnss_reason else "gnss valid"
        if source == "odometry":
            level, msg = OK, f"odometry ({odometry})"
        elif source == "gnss":
            # Without odometry this is normal; with odometry received but not used, say why.
            level = WARN if math.isfinite(odo_age) or odo_error else OK
            msg = f"gnss ({odometry})"
        else:
            level, msg = WARN, f"none: {odometry}; {gnss}"
        speed = assessment.ego_speed if assessment is not None else None
        return StatusItem(
            name=f"{self.node_name}: ego_speed", level=level, message=msg, hardware_id="odometry",
            values={"source": source, "speed_mps": f"{speed:.2f}" if speed is not None else "",
                    "odometry_age_s": f"{odo_age:.3f}" if math.isfinite(odo_age) else "inf",
                    "odometry_rate_hz": f"{self.odometry_rate.rate(now):.2f}",
                    "odometry_rejected": str(self._rejected_total["odometry"]),
                    "odometry_last_error": odo_error, "gnss_reason": gnss_reason})
