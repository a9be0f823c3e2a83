"""Latest frame per sensor, staleness and the modality mask.

Latest-value semantics: each sensor keeps only its newest frame (by ``header.stamp``); a snapshot
never waits for a late sensor, it masks it out. Thread-safe: node callbacks run on several threads.

Rules applied by :meth:`SensorSync.update` (each rejection is counted per sensor and reason):

- ``unknown_sensor``: the sensor is not in :attr:`SyncConfig.sensors`.
- ``invalid_stamp``: the stamp is not a finite number.
- ``future``: the stamp is more than ``future_tolerance`` [s] ahead of the reference time, which is
  the ``now`` given to ``update`` or else the latest snapshot's ``now`` (no check when neither exists).
- ``out_of_order``: the stamp is not newer than this sensor's latest frame (equal counts too) but
  not older by more than ``loop_reset``.
- A stamp older than the sensor's latest by more than ``loop_reset`` [s] (a bag loop or a restarted
  simulation) clears every buffer and the snapshot reference time, counts a reset and is accepted.
  A snapshot whose ``now`` is older than the previous snapshot's by more than ``loop_reset`` does
  the same.

:meth:`SensorSync.snapshot` masks out a sensor with no frame, a frame older than its timeout, or a
frame stamped more than ``future_tolerance`` after ``now``; a masked sensor's frame is None, and
``Snapshot.reasons`` says why in words ("no message yet", "stale (0.83 s old > 0.5 s)", a hint when the
stamps are far behind the clock: a bag replayed without ``use_sim_time`` or an unsynchronised sensor clock).

``SyncConfig.extra_sensors`` (``odometry``) are buffered by the same rules, with their own timeouts,
but are not modalities: they appear in the snapshot's dicts, never in its mask.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmm_fusion.base.vocabulary import MODALITIES

REJECT_REASONS: tuple[str, ...] = ("unknown_sensor", "invalid_stamp", "future", "out_of_order")
#: Timeouts [s] of the extra (non-modality) sensors when ``SyncConfig.timeouts`` does not name them.
EXTRA_TIMEOUTS: dict[str, float] = {"odometry": 0.5}
#: A frame older than this [s] is not just late: its clock is another one (see :func:`stale_reason`).
CLOCK_MISMATCH_S = 10.0


def stale_reason(age: float, timeout: float) -> str:
    """Why a frame ``age`` [s] old is masked with ``timeout`` [s]; far beyond any sensor delay, the
    stamps are on another clock, and the reason says which two are likely."""
    if age > CLOCK_MISMATCH_S:
        return (f"stale: stamps are {age:.0f} s behind the node clock: replaying a bag? set use_sim_time "
                "(else the sensor clock is not synchronised)")
    return f"stale ({age:.2f} s old > {timeout:g} s)"


def future_reason(ahead: float, tolerance: float) -> str:
    """Why a frame stamped ``ahead`` [s] after the clock is masked or rejected."""
    return f"stamp {ahead:.2f} s ahead of the node clock (> {tolerance:g} s): sensor clock not synchronised?"


@dataclass(frozen=True)
class SyncConfig:
    """``timeouts`` [s]: maximum frame age per sensor before it is masked out; ``loop_reset`` [s]:
    a backwards jump larger than this resets every buffer; ``future_tolerance`` [s]: how far ahead of
    the reference time a stamp may be (clock offsets between machines); ``sensors``: accepted names,
    in mask order."""

    timeouts: dict[str, float] = field(default_factory=lambda: {"camera": 0.5, "lidar": 0.5, "gnss": 1.0})
    loop_reset: float = 1.0
    future_tolerance: float = 0.5
    sensors: tuple[str, ...] = MODALITIES
    #: Buffered like the sensors but outside the mask (optional inputs such as wheel odometry).
    extra_sensors: tuple[str, ...] = tuple(EXTRA_TIMEOUTS)

    def timeout(self, sensor: str) -> float:
        """Timeout [s] of ``sensor`` (an extra sensor not in ``timeouts`` takes :data:`EXTRA_TIMEOUTS`)."""
        t = self.timeouts.get(sensor)
        return float(t) if t is not None else EXTRA_TIMEOUTS.get(sensor, 0.5)

    def judge(self, sensor: str, age: float) -> str:
        """Why a frame of ``sensor`` ``age`` [s] old (now - stamp) is not usable; "" when it is (within the
        sensor's timeout and at most ``future_tolerance`` ahead of the clock)."""
        timeout = self.timeout(sensor)
        if -self.future_tolerance <= age <= timeout:
            return ""
        return stale_reason(age, timeout) if age > 0 else future_reason(-age, self.future_tolerance)

    def __post_init__(self) -> None:
        for s in (*self.sensors, *(e for e in self.extra_sensors if e in self.timeouts)):
            t = self.timeouts.get(s)
            if t is None or not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
                raise ValueError(f"timeouts[{s!r}]: need a positive finite timeout [s], got {t!r}")
        for name in ("loop_reset", "future_tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: need a finite value >= 0 [s], got {v!r}")


@dataclass(frozen=True)
class Snapshot:
    """Frames usable at ``now`` [s]. ``frames[s]`` is None when masked; ``ages[s]`` = now - stamp [s]
    (inf without a frame); ``mask`` (len(sensors),) bool in ``SyncConfig.sensors`` order (True =
    present); ``stamps[s]`` [s] or None; ``frame_ids[s]``: the ``header.frame_id`` of the frame (absent
    or None when the frame was given without one: a LiDAR cloud is then in the rig's ``lidar`` frame);
    ``reasons[s]``: why ``s`` is masked ("" when usable). The dicts also hold the extra sensors once one
    of their messages arrived."""

    now: float
    frames: dict[str, Any | None]
    ages: dict[str, float]
    mask: np.ndarray
    stamps: dict[str, float | None]
    frame_ids: dict[str, str | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class SensorCounters:
    """Diagnostics for one sensor: ``received`` (update calls), ``accepted``, ``rejected`` by reason."""

    received: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class SensorSync:
    """Per-sensor latest-frame buffers (see the module docstring for the rules)."""

    def __init__(self, config: SyncConfig | None = None) -> None:
        self.config = config or SyncConfig()
        self._lock = threading.Lock()
        self._frames: dict[str, tuple[float, Any, str | None]] = {}
        self._last_snapshot: float | None = None
        self._counters: dict[str, SensorCounters] = {
            s: SensorCounters() for s in (*self.config.sensors, *self.config.extra_sensors)}
        # Why each sensor's latest message was refused (shown while it has no usable frame).
        self._last_reject: dict[str, str] = {}
        self._unknown = SensorCounters()
        self.resets = 0

    def update(self, sensor: str, stamp: float, data: Any, now: float | None = None,
               frame_id: str | None = None) -> bool:
        """Offer a frame stamped ``stamp`` [s] in ``frame_id`` (its ``header.frame_id``, kept with it for the
        snapshot); True when stored, False when rejected (counted)."""
        with self._lock:
            c = self._counters.get(sensor)
            if c is None:
                self._unknown.received += 1
                self._unknown.rejected["unknown_sensor"] += 1
                return False
            c.received += 1
            try:
                stamp = float(stamp)
            except (TypeError, ValueError):
                stamp = math.nan
            if not math.isfinite(stamp):
                c.rejected["invalid_stamp"] += 1
                self._last_reject[sensor] = "stamp is not a finite number"
                return False
            ref = now if now is not None and math.isfinite(now) else self._last_snapshot
            if ref is not None and stamp > ref + self.config.future_tolerance:
                c.rejected["future"] += 1
                self._last_reject[sensor] = future_reason(stamp - ref, self.config.future_tolerance)
                return False
            prev = self._frames.get(sensor)
            if prev is not None and stamp <= prev[0]:
                if prev[0] - stamp > self.config.loop_reset:
                    self._reset_locked()
                else:
                    c.rejected["out_of_order"] += 1
                    self._last_reject[sensor] = "stamps out of order"
                    return False
            self._last_reject.pop(sensor, None)
            self._frames[sensor] = (stamp, data, frame_id)
            c.accepted += 1
            return True

    def note_rejected(self, sensor: str, reason: str) -> None:
        """Record why a message of ``sensor`` was refused before reaching :meth:`update` (it did not decode,
        an implausible GNSS jump): while the sensor has no usable frame, its snapshot reason says so."""
        with self._lock:
            self._last_reject[sensor] = reason

    def snapshot(self, now: float) -> Snapshot:
        """The newest usable frame set at ``now`` [s] (never waits)."""
        with self._lock:
            if self._last_snapshot is not None and self._last_snapshot - now > self.config.loop_reset:
                self._reset_locked()
            self._last_snapshot = now
            frames: dict[str, Any | None] = {}
            ages: dict[str, float] = {}
            stamps: dict[str, float | None] = {}
            frame_ids: dict[str, str | None] = {}
            reasons: dict[str, str] = {}
            cfg = self.config
            mask = np.zeros(len(cfg.sensors), bool)
            for i, s in enumerate((*cfg.sensors, *cfg.extra_sensors)):
                entry = self._frames.get(s)
                if entry is None and i >= len(cfg.sensors) and s not in self._last_reject:
                    continue  # an optional input never received: not in the snapshot at all
                if entry is None:
                    frames[s], ages[s], stamps[s], frame_ids[s] = None, math.inf, None, None
                    refused = self._last_reject.get(s)
                    reasons[s] = f"no usable message ({refused})" if refused else "no message yet"
                    continue
                stamp, data, frame_ids[s] = entry
                age = now - stamp
                reasons[s] = cfg.judge(s, age)
                usable = not reasons[s]
                frames[s] = data if usable else None
                ages[s] = age
                stamps[s] = stamp
                if not usable and s in self._last_reject:  # newer messages came, and were refused
                    reasons[s] += f"; last message rejected: {self._last_reject[s]}"
                if i < len(cfg.sensors):
                    mask[i] = usable
            return Snapshot(now=now, frames=frames, ages=ages, mask=mask, stamps=stamps, frame_ids=frame_ids,
                            reasons=reasons)

    def reset(self) -> None:
        """Forget every frame and the snapshot reference time (counted in :attr:`resets`)."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._frames.clear()
        self._last_reject.clear()
        self._last_snapshot = None
        self.resets += 1

    def counters(self) -> dict[str, SensorCounters]:
        """A copy of the per-sensor counters (plus ``"unknown"`` for unknown sensor names)."""
        with self._lock:
            out = {
                s: SensorCounters(c.received, c.accepted, Counter(c.rejected)) for s, c in self._counters.items()
            }
            u = self._unknown
            out["unknown"] = SensorCounters(u.received, u.accepted, Counter(u.rejected))
            return out

    def diagnostics(self) -> dict[str, str]:
        """Flat key -> value strings (for diagnostic_msgs/KeyValue)."""
        out: dict[str, str] = {"resets": str(self.resets)}
        for s, c in self.counters().items():
            if s == "unknown" and not c.received:
                continue
            out[f"{s}.received"] = str(c.received)
            out[f"{s}.accepted"] = str(c.accepted)
            for reason in REJECT_REASONS:
                if c.rejected[reason]:
                    out[f"{s}.rejected.{reason}"] = str(c.rejected[reason])
        return out
