"""Drive the fusion cycle from a recorded bag, in bag time, as fast as the machine allows.

Messages are fed in recorded order through :class:`~lmm_fusion.cycle.ingest.SensorIngest` (the node's
decode path) into a :class:`~lmm_fusion.cycle.sync.SensorSync`; every ``1/rate_hz`` seconds of *bag* time a
cycle is emitted with the sync snapshot at that instant, exactly as the node's timer would see it.
Used by replay and INT8 calibration; deterministic for a given bag.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmm_fusion.base import topics as T
from lmm_fusion.cycle.ingest import SENSOR_OF_MSGTYPE, SensorIngest
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.io import MessageError, read_fix, read_image, read_points
from lmm_fusion.io.bags import BagMessage, BagReader
from lmm_fusion.io.common import stamp_to_sec

log = logging.getLogger(__name__)

GROUND_TRUTH_TOPICS: tuple[str, ...] = (T.GT_SCENE, T.GT_ACTION, T.GT_OCCUPANCY, T.GT_SCENARIO, T.GT_EGO)


def first_message(reader: BagReader, topic: str) -> Any | None:
    """The first recorded message of ``topic`` in an open ``reader`` (None when it has none)."""
    for m in reader.messages({topic}):
        return m.msg
    return None


def _decode_error(sensor: str, msg: Any | None) -> str:
    """Why ``msg`` cannot feed ``sensor`` ("" when it can): it does not decode, or a camera image is
    single-channel (a depth or grey image next to the colour one)."""
    if msg is None:
        return "no messages"
    try:
        if sensor == "camera":
            encoding = getattr(msg, "encoding", None)  # CompressedImage has none: JPEG/PNG are colour
            if isinstance(encoding, str) and (encoding.startswith("mono") or encoding.endswith("C1")):
                return f"single-channel encoding {encoding!r} (depth or grey, not a colour camera)"
            read_image(msg)
        elif sensor == "lidar":
            read_points(msg, ("x", "y", "z", "intensity"))
        else:
            read_fix(msg)
    except MessageError as exc:
        return str(exc)
    return ""


def detect_sensor_topics(
    topic_types: dict[str, str],
    overrides: dict[str, str] | None = None,
    first: Callable[[str], Any | None] | None = None,
) -> dict[str, str]:
    """``{topic: sensor}`` for the bag's sensor topics.

    ``overrides`` maps sensor -> topic and wins. Otherwise the project's default topic name is
    preferred, then the one topic of a matching message type (Image or CompressedImage for the
    camera, PointCloud2 for the LiDAR, NavSatFix for GNSS); a sensor with no topic is simply absent
    (it replays masked). Several topics of one type (a colour and a 16-bit depth image) are never
    chosen between silently: with ``first`` (topic -> its first message), the only usable one (its
    first message decodes; for the camera, in colour) is taken, with a warning; otherwise a
    ``ValueError`` lists the candidates.
    """
    overrides = overrides or {}
    defaults = {"camera": (T.CAMERA_IMAGE, T.CAMERA_COMPRESSED), "lidar": (T.LIDAR_POINTS,), "gnss": (T.GNSS_FIX,)}
    chosen: dict[str, str] = {}
    for sensor in ("camera", "lidar", "gnss"):
        if sensor in overrides:
            topic = overrides[sensor]
            if topic not in topic_types:
                raise ValueError(f"{sensor}_topic: {topic!r} is not in the bag (topics: {sorted(topic_types)})")
            chosen[topic] = sensor
            continue
        preferred = [t for t in defaults[sensor] if SENSOR_OF_MSGTYPE.get(topic_types.get(t, "")) == sensor]
        if preferred:
            chosen[preferred[0]] = sensor
            continue
        candidates = sorted(t for t, ty in topic_types.items() if SENSOR_OF_MSGTYPE.get(ty) == sensor)
        if len(candidates) == 1:
            chosen[candidates[0]] = sensor
        elif candidates:
            chosen[_choose(sensor, candidates, topic_types, first)] = sensor
    return chosen


def _choose(sensor: str, candidates: list[str], topic_types: dict[str, str],
            first: Callable[[str], Any | None] | None) -> str:
    """The one usable topic of several of ``sensor``'s type, or a ValueError listing them."""
    errors = {t: _decode_error(sensor, first(t)) for t in candidates} if first is not None else {}
    usable = [t for t in candidates if first is not None and not errors[t]]
    listed = "; ".join(f"{t} ({topic_types[t]}{': ' + errors[t] if errors.get(t) else ''})" for t in candidates)
    if len(usable) == 1:
        log.warning("%d %s topics in the bag: using %s, the only one that decodes (candidates: %s); "
                    "choose another with --%s-topic", len(candidates), sensor, usable[0], listed, sensor)
        return usable[0]
    usable_note = f", {len(usable)} of them usable" if first is not None else ""
    raise ValueError(f"{sensor}: {len(candidates)} candidate topics in the bag{usable_note}: {listed}; "
                     f"choose one with --{sensor}-topic")


@dataclass
class ClockCheck:
    """How far each sensor's header stamps lie behind its messages' record (bag) time.

    A sensor whose clock is not synchronised with the recorder (stamps 1e6 s behind the bag time) has its
    frames accepted and then masked as too old in every cycle; :meth:`mismatches` says so per sensor.
    ``limits`` [s]: the largest offset still consistent (the sync timeouts: an older frame is masked).
    """

    limits: dict[str, float]
    counts: Counter[str] = field(default_factory=Counter)  # accepted messages per sensor
    far: Counter[str] = field(default_factory=Counter)  # of them, stamped beyond the limit
    far_sum: dict[str, float] = field(default_factory=dict)  # sum of those offsets [s]

    def note(self, sensor: str, bag_t: float, stamp: float) -> None:
        """One accepted message of ``sensor``: record time ``bag_t`` and header ``stamp`` [s]."""
        self.counts[sensor] += 1
        behind = bag_t - stamp
        if abs(behind) > self.limits.get(sensor, math.inf):
            if not self.far[sensor]:
                log.warning("%s: stamps %.3g s %s the bag time (first at bag time %.3f): frames will be masked "
                            "as too old", sensor, abs(behind), "behind" if behind > 0 else "ahead of", bag_t)
            self.far[sensor] += 1
            self.far_sum[sensor] = self.far_sum.get(sensor, 0.0) + behind

    def mismatches(self) -> dict[str, str]:
        """``{sensor: "clock mismatch: stamps N s behind the bag time"}`` for sensors with at least half of
        their accepted messages stamped beyond the limit (N = their mean offset)."""
        out: dict[str, str] = {}
        for sensor, n in sorted(self.counts.items()):
            far = self.far[sensor]
            if far and 2 * far >= n:
                mean = self.far_sum[sensor] / far
                where = "behind" if mean > 0 else "ahead of"
                out[sensor] = (f"clock mismatch: stamps {abs(mean):.6g} s {where} the bag time "
                               f"({far} of {n} accepted messages beyond {self.limits[sensor]:g} s)")
        return out


@dataclass
class BagCycle:
    """One cycle of a bag replay: bag time [s], the sync snapshot, and the latest ground truth."""

    t: float
    snapshot: Snapshot
    ground_truth: dict[str, tuple[float, Any]] = field(default_factory=dict)  # topic -> (stamp, msg)


def iter_cycles(
    paths: Path | str | Sequence[Path | str] | BagReader,
    ingest: SensorIngest,
    rate_hz: float = 10.0,
    sensor_topics: dict[str, str] | None = None,
    with_ground_truth: bool = True,
    passthrough: Iterable[str] = (),
    on_passthrough: Callable[[BagMessage], None] | None = None,
    clock: ClockCheck | None = None,
) -> Iterator[BagCycle]:
    """Cycles at ``rate_hz`` in bag time over the whole bag (see module docstring).

    ``sensor_topics`` maps sensor -> topic (auto-detected by type when omitted). Ground truth is the
    latest message of each ``/ground_truth/*`` topic recorded at or before the cycle time.
    ``passthrough`` topics (those present in the bag) are also read, and every message of them is
    handed to ``on_passthrough`` in recorded order, after the cycles that precede it were yielded
    (replay copies camera, points and ``/tf_static`` into its output bag this way, reading once).
    ``/tf_static`` messages are fed to ``ingest.on_tf`` (when ``ingest.extrinsics`` is set) as they come,
    so clouds after them are placed by the bag's own transforms. ``paths`` may be an open
    :class:`~lmm_fusion.io.bags.BagReader` (read once, not closed here). A bad
    bag raises :class:`~lmm_fusion.io.bags.BagError` after the cycles before the damage were yielded.
    ``clock`` notes how far each accepted sensor message's header stamp lies from its record time.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz: must be > 0, got {rate_hz}")
    if isinstance(paths, BagReader):
        yield from _cycles(paths, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough,
                           clock)
        return
    with BagReader(paths) as reader:
        yield from _cycles(reader, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough,
                           clock)


def _cycles(
    reader: BagReader,
    ingest: SensorIngest,
    rate_hz: float,
    sensor_topics: dict[str, str] | None,
    with_ground_truth: bool,
    passthrough: Iterable[str],
    on_passthrough: Callable[[BagMessage], None] | None,
    clock: ClockCheck | None = None,
) -> Iterator[BagCycle]:
    topic_types = reader.topics
    sensor_of = detect_sensor_topics(topic_types, sensor_topics, lambda t: first_message(reader, t))
    gt_topics = {t for t in GROUND_TRUTH_TOPICS if t in topic_types} if with_ground_truth else set()
    wanted = set(sensor_of) | gt_topics
    copied = {t for t in passthrough if t in topic_types} if on_passthrough is not None else set()
    wanted |= copied
    # The bag's own /tf_static places each cloud by its frame id (ingest.extrinsics, shared with the pipeline).
    tf_topics = {T.TF_STATIC} & set(topic_types) if ingest.extrinsics is not None else set()
    wanted |= tf_topics
    period = 1.0 / rate_hz
    next_t: float | None = None
    gt: dict[str, tuple[float, Any]] = {}
    for m in reader.messages(wanted):
        fed = m.topic in sensor_of or m.topic in gt_topics
        if m.topic in tf_topics:
            ingest.on_tf(m.msg)
        if next_t is None:
            if not fed:  # a copied-only topic does not start the clock (same cycle times as without it)
                if m.topic in copied:
                    on_passthrough(m)  # type: ignore[misc]  # copied is empty when it is None
                continue
            next_t = m.stamp_sec + period  # first cycle one period after the first message
        while m.stamp_sec >= next_t:
            yield BagCycle(next_t, ingest.sync.snapshot(next_t), dict(gt))
            next_t += period
        if m.topic in copied:
            on_passthrough(m)  # type: ignore[misc]  # copied is empty when it is None
        sensor = sensor_of.get(m.topic)
        if sensor is not None:
            if ingest.on_message(sensor, m.msg, now=m.stamp_sec) and clock is not None:
                clock.note(sensor, m.stamp_sec, stamp_to_sec(m.msg.header.stamp))
        elif m.topic in gt_topics:
            gt[m.topic] = (m.stamp_sec, m.msg)
    if next_t is not None:
        yield BagCycle(next_t, ingest.sync.snapshot(next_t), dict(gt))
