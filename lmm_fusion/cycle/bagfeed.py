"""Drive the fusion cycle from a recorded bag, in bag time, as fast as the machine allows.

Messages are fed in recorded order through :class:`~lmm_fusion.cycle.ingest.SensorIngest` (the node's
decode path) into a :class:`~lmm_fusion.cycle.sync.SensorSync`; every ``1/rate_hz`` seconds of *bag* time a
cycle is emitted with the sync snapshot at that instant, exactly as the node's timer would see it.
Used by replay and INT8 calibration; deterministic for a given bag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmm_fusion.base import topics as T
from lmm_fusion.cycle.ingest import SENSOR_OF_MSGTYPE, SensorIngest
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.io.bags import BagMessage, BagReader

GROUND_TRUTH_TOPICS: tuple[str, ...] = (T.GT_SCENE, T.GT_ACTION, T.GT_OCCUPANCY, T.GT_SCENARIO, T.GT_EGO)


def detect_sensor_topics(topic_types: dict[str, str], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """``{topic: sensor}`` for the bag's sensor topics.

    ``overrides`` maps sensor -> topic and wins. Otherwise the project's default topic names are
    preferred, then the first topic of a matching message type (Image or CompressedImage for the
    camera, PointCloud2 for the LiDAR, NavSatFix for GNSS); a sensor with no topic is simply absent
    (it replays masked).
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
        candidates = [t for t in defaults[sensor] if SENSOR_OF_MSGTYPE.get(topic_types.get(t, "")) == sensor]
        candidates += sorted(t for t, ty in topic_types.items() if SENSOR_OF_MSGTYPE.get(ty) == sensor)
        if candidates:
            chosen[candidates[0]] = sensor
    return chosen


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
) -> Iterator[BagCycle]:
    """Cycles at ``rate_hz`` in bag time over the whole bag (see module docstring).

    ``sensor_topics`` maps sensor -> topic (auto-detected by type when omitted). Ground truth is the
    latest message of each ``/ground_truth/*`` topic recorded at or before the cycle time.
    ``passthrough`` topics (those present in the bag) are also read, and every message of them is
    handed to ``on_passthrough`` in recorded order, after the cycles that precede it were yielded
    (replay copies camera, points and ``/tf_static`` into its output bag this way, reading once).
    ``paths`` may be an open :class:`~lmm_fusion.io.bags.BagReader` (read once, not closed here). A bad
    bag raises :class:`~lmm_fusion.io.bags.BagError` after the cycles before the damage were yielded.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz: must be > 0, got {rate_hz}")
    if isinstance(paths, BagReader):
        yield from _cycles(paths, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough)
        return
    with BagReader(paths) as reader:
        yield from _cycles(reader, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough)


def _cycles(
    reader: BagReader,
    ingest: SensorIngest,
    rate_hz: float,
    sensor_topics: dict[str, str] | None,
    with_ground_truth: bool,
    passthrough: Iterable[str],
    on_passthrough: Callable[[BagMessage], None] | None,
) -> Iterator[BagCycle]:
    topic_types = reader.topics
    sensor_of = detect_sensor_topics(topic_types, sensor_topics)
    gt_topics = {t for t in GROUND_TRUTH_TOPICS if t in topic_types} if with_ground_truth else set()
    wanted = set(sensor_of) | gt_topics
    copied = {t for t in passthrough if t in topic_types} if on_passthrough is not None else set()
    wanted |= copied
    period = 1.0 / rate_hz
    next_t: float | None = None
    gt: dict[str, tuple[float, Any]] = {}
    for m in reader.messages(wanted):
        fed = m.topic in sensor_of or m.topic in gt_topics
        if next_t is None:
            if not fed:  # a copied-only topic does not start the clock (same cycle times as without it)
                on_passthrough(m)  # type: ignore[misc]  # only copied topics get here
                continue
            next_t = m.stamp_sec + period  # first cycle one period after the first message
        while m.stamp_sec >= next_t:
            yield BagCycle(next_t, ingest.sync.snapshot(next_t), dict(gt))
            next_t += period
        if m.topic in copied:
            on_passthrough(m)  # type: ignore[misc]  # copied is empty when it is None
        sensor = sensor_of.get(m.topic)
        if sensor is not None:
            ingest.on_message(sensor, m.msg, now=m.stamp_sec)
        elif m.topic in gt_topics:
            gt[m.topic] = (m.stamp_sec, m.msg)
    if next_t is not None:
        yield BagCycle(next_t, ingest.sync.snapshot(next_t), dict(gt))
