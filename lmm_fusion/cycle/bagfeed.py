"""Drive the fusion cycle from a recorded bag, in bag time, as fast as the machine allows.

Messages are fed in recorded order through :class:`~lmm_fusion.cycle.ingest.SensorIngest` (the node's
decode path) into a :class:`~lmm_fusion.cycle.sync.SensorSync`; every ``1/rate_hz`` seconds of *bag* time a
cycle is emitted with the sync snapshot at that instant, exactly as the node's timer would see it.
Camera and LiDAR frames are decoded only when a cycle uses them, and reading can run in a background
thread ahead of the cycles (:func:`iter_cycles`, ``prefetch``). Used by replay and INT8 calibration;
deterministic for a given bag.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmm_fusion.base import topics as T
from lmm_fusion.cycle.ingest import SENSOR_OF_MSGTYPE, SensorIngest
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.io import MessageError, read_fix, read_image, read_odometry, read_points
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
        elif sensor == "odometry":
            read_odometry(msg)
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
    defaults = {"camera": (T.CAMERA_IMAGE, T.CAMERA_COMPRESSED), "lidar": (T.LIDAR_POINTS,), "gnss": (T.GNSS_FIX,),
                "odometry": (T.ODOMETRY,)}
    chosen: dict[str, str] = {}
    for sensor in ("camera", "lidar", "gnss", "odometry"):
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
        # Never a ground-truth topic (the synthetic bags' true ego odometry) as a sensor input.
        candidates = sorted(t for t, ty in topic_types.items()
                            if SENSOR_OF_MSGTYPE.get(ty) == sensor and t not in GROUND_TRUTH_TOPICS)
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


#: Sensors whose frames are decoded only when a cycle uses them: their decoders are stateless, and a
#: camera at 20 Hz or a JPEG stream under a 10 Hz cycle leaves every other frame unused. (GNSS feeds a
#: stateful ego-motion estimator that must see every fix; it is decoded as it comes, as are the others.)
LAZY_SENSORS: tuple[str, ...] = ("camera", "lidar")
#: Undecoded frames kept per sensor to fall back on when a cycle's newest one does not decode.
MAX_PENDING = 32


class _LazyFrame:
    """A sensor message accepted into the sync by its header stamp; decoded (once) when a cycle uses it."""

    __slots__ = ("error", "msg", "sensor", "value")

    def __init__(self, sensor: str, msg: Any) -> None:
        self.sensor = sensor
        self.msg: Any = msg
        self.value: Any = None
        self.error: str | None = None

    def resolve(self, ingest: SensorIngest, accepted: bool = True) -> bool:
        """Decode through ``ingest.decode`` (the node's decode path) on first use; True when it decoded.
        A failure is counted once as that sensor's rejection (moved from accepted when ``accepted``)."""
        if self.msg is not None:
            try:
                self.value = ingest.decode(self.sensor, self.msg)[1]
            except MessageError as exc:
                self.error = str(exc)
                ingest.count_rejected(self.sensor, self.error, was_accepted=accepted)
            self.msg = None  # the decoded frame keeps what it needs of the message
        return self.error is None


@dataclass
class _Pending:
    """Frames of the lazy sensors accepted into the sync since the last one a cycle decoded:
    ``(stamp [s], frame, frame_id)`` oldest first, and each sensor's newest accepted stamp [s]."""

    frames: dict[str, list[tuple[float, _LazyFrame, str | None]]] = field(default_factory=dict)
    newest: dict[str, float] = field(default_factory=dict)
    resets: int = 0

    def clear_on_reset(self, ingest: SensorIngest) -> None:
        """Forget everything when the sync was reset since the last call (its buffers are empty)."""
        if ingest.sync.resets != self.resets:
            self.resets = ingest.sync.resets
            self.frames.clear()
            self.newest.clear()


def _offer(ingest: SensorIngest, sensor: str, msg: Any, now: float, pending: _Pending) -> tuple[bool, float | None]:
    """Feed one sensor message received at bag time ``now`` [s]: ``(accepted, header stamp [s] or None)``.

    GNSS and odometry take the node's path (:meth:`SensorIngest.on_message`). A camera or LiDAR message
    newer than that sensor's newest frame goes to the sync undecoded (:class:`_LazyFrame`), counted as
    ``on_message`` counts; one that is not newer (out of order, or a bag loop that resets the sync) is
    decoded first, as the node does, so an undecodable frame never reaches the sync's order and reset
    rules and they decide as with every frame decoded.
    """
    pending.clear_on_reset(ingest)
    if sensor not in LAZY_SENSORS:
        accepted = ingest.on_message(sensor, msg, now=now)
        pending.clear_on_reset(ingest)
        return accepted, stamp_to_sec(msg.header.stamp) if accepted else None
    header = getattr(msg, "header", None)
    if header is None or not hasattr(header, "stamp"):
        ingest.count_rejected(sensor, f"{sensor}: message has no header.stamp")
        return False, None
    try:
        stamp = stamp_to_sec(header.stamp)
    except MessageError as exc:
        ingest.count_rejected(sensor, str(exc))
        return False, None
    lazy = _LazyFrame(sensor, msg)
    newest = pending.newest.get(sensor)
    not_newer = not math.isfinite(stamp) or (newest is not None and stamp <= newest)
    if not_newer and not lazy.resolve(ingest, accepted=False):
        return False, None
    frame_id = getattr(header, "frame_id", None)
    frame_id = None if frame_id is None else str(frame_id)
    accepted = ingest.sync.update(sensor, stamp, lazy, now=now, frame_id=frame_id)
    pending.clear_on_reset(ingest)
    if not accepted:
        ingest.count_rejected(sensor, ingest.SYNC_REFUSED, refused_by_sync=True)
        return False, None
    ingest.count_accepted(sensor)
    kept = pending.frames.setdefault(sensor, [])
    if lazy.msg is None:  # decoded already: nothing older is needed as a fallback
        kept.clear()
    kept.append((stamp, lazy, frame_id))
    del kept[:-MAX_PENDING]
    pending.newest[sensor] = stamp
    return True, stamp


def _resolved(snap: Snapshot, ingest: SensorIngest, pending: _Pending) -> Snapshot:
    """``snap`` with its lazy frames decoded. A newest frame that does not decode is rejected (counted)
    and the cycle gets the newest earlier one that does and is still fresh, as the sync would have held
    with every frame decoded on arrival; none masks the sensor."""
    pending.clear_on_reset(ingest)
    frames = dict(snap.frames)
    for sensor in LAZY_SENSORS:
        frame = frames.get(sensor)
        if not isinstance(frame, _LazyFrame):
            continue
        if frame.resolve(ingest):
            frames[sensor] = frame.value
            kept = pending.frames.get(sensor, [])
            for i, (_, f, _) in enumerate(kept):  # older frames can no longer be needed as a fallback
                if f is frame:
                    del kept[:i]
                    break
            continue
        snap = _fallback(snap, sensor, frames, ingest, pending)
    return replace(snap, frames=frames)


def _fallback(snap: Snapshot, sensor: str, frames: dict[str, Any], ingest: SensorIngest,
              pending: _Pending) -> Snapshot:
    """``snap`` with ``sensor``'s newest frame (which did not decode) replaced by the newest earlier one
    that decodes, masked unless usable at ``snap.now`` by the sync's rules (sets ``frames[sensor]``)."""
    cfg = ingest.sync.config
    i = cfg.sensors.index(sensor)
    error = frames[sensor].error
    mask = snap.mask.copy()
    mask[i] = False
    frames[sensor] = None
    stamp: float | None = None
    age, frame_id, reason = math.inf, None, f"no usable message ({error})"
    for s, f, fid in reversed(pending.frames.get(sensor, [])):
        if f.error is None and f.resolve(ingest):
            stamp, age, frame_id = s, snap.now - s, fid
            # The judgement and reason SensorSync.snapshot gives this frame, a newer one having been refused.
            reason = cfg.judge(sensor, age)
            mask[i] = not reason
            frames[sensor] = f.value if mask[i] else None
            if reason:
                reason += f"; last message rejected: {error}"
            break
    return replace(snap, mask=mask, ages={**snap.ages, sensor: age}, stamps={**snap.stamps, sensor: stamp},
                   frame_ids={**snap.frame_ids, sensor: frame_id}, reasons={**snap.reasons, sensor: reason})


def iter_cycles(
    paths: Path | str | Sequence[Path | str] | BagReader,
    ingest: SensorIngest,
    rate_hz: float = 10.0,
    sensor_topics: dict[str, str] | None = None,
    with_ground_truth: bool = True,
    passthrough: Iterable[str] = (),
    on_passthrough: Callable[[BagMessage], None] | None = None,
    clock: ClockCheck | None = None,
    prefetch: int = 0,
    ahead: Callable[[Snapshot], None] | None = None,
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

    Camera and LiDAR frames are decoded only when a cycle uses them (:data:`LAZY_SENSORS`): a frame
    that a newer one replaces before the next cycle is never decoded (nor counted as rejected should it
    be corrupt: it is accepted by its header); a cycle's frame that does not decode is counted as
    rejected and the cycle uses the newest earlier frame that decodes, as with every frame decoded.

    ``prefetch > 0`` reads, deserialises, decodes and syncs in a background thread, up to ``prefetch``
    events (cycles, copied messages) ahead of the caller, so that work overlaps the caller's cycles
    (numpy, OpenCV and the inference backends release the GIL). Everything that touches the caller's
    state (``on_passthrough``, ``ingest.on_tf``) still runs in the caller's thread, in the same order
    as without it, so the cycles and everything derived from them are identical. ``ahead`` (with
    ``prefetch > 0``) is called in that thread with each cycle's snapshot before it is queued: stateless
    work on its frames that the cycle would otherwise do (replay resizes the camera image there,
    :meth:`~lmm_fusion.cycle.preprocess.Preprocessor.prepare_image`).
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz: must be > 0, got {rate_hz}")
    if prefetch < 0:
        raise ValueError(f"prefetch: must be >= 0, got {prefetch}")
    if isinstance(paths, BagReader):
        yield from _drive(paths, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough,
                          clock, prefetch, ahead)
        return
    with BagReader(paths) as reader:
        yield from _drive(reader, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough, on_passthrough,
                          clock, prefetch, ahead)


#: What :func:`_events` yields: a cycle, a message to copy, or a ``/tf_static`` message to feed.
_CYCLE, _COPY, _TF = "cycle", "copy", "tf"
_END = ("end", None)


def _drive(
    reader: BagReader,
    ingest: SensorIngest,
    rate_hz: float,
    sensor_topics: dict[str, str] | None,
    with_ground_truth: bool,
    passthrough: Iterable[str],
    on_passthrough: Callable[[BagMessage], None] | None,
    clock: ClockCheck | None,
    prefetch: int,
    ahead: Callable[[Snapshot], None] | None = None,
) -> Iterator[BagCycle]:
    """Apply :func:`_events` in the caller's thread: cycles are yielded, copies and transforms applied."""
    events = _events(reader, ingest, rate_hz, sensor_topics, with_ground_truth, passthrough,
                     on_passthrough is not None, clock, ahead if prefetch > 0 else None)
    stream = events if prefetch == 0 else _prefetched(events, prefetch)
    try:
        for kind, item in stream:
            if kind == _CYCLE:
                yield item
            elif kind == _COPY:
                on_passthrough(item)  # type: ignore[misc]  # no copies without it
            else:
                ingest.on_tf(item)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _prefetched(events: Iterator[tuple[str, Any]], depth: int) -> Iterator[tuple[str, Any]]:
    """``events`` produced by a background thread, at most ``depth`` ahead; its exceptions are raised
    here, at the point of the stream where they happened. Closing the generator stops the thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for ev in events:
                if not put(ev):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=produce, name="bagfeed-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield kind, item
    finally:
        stop.set()
        thread.join()
        events.close()  # type: ignore[attr-defined]  # a generator


def _events(
    reader: BagReader,
    ingest: SensorIngest,
    rate_hz: float,
    sensor_topics: dict[str, str] | None,
    with_ground_truth: bool,
    passthrough: Iterable[str],
    copy: bool,
    clock: ClockCheck | None = None,
    ahead: Callable[[Snapshot], None] | None = None,
) -> Iterator[tuple[str, Any]]:
    topic_types = reader.topics
    sensor_of = detect_sensor_topics(topic_types, sensor_topics, lambda t: first_message(reader, t))
    gt_topics = {t for t in GROUND_TRUTH_TOPICS if t in topic_types} if with_ground_truth else set()
    wanted = set(sensor_of) | gt_topics
    copied = {t for t in passthrough if t in topic_types} if copy else set()
    wanted |= copied
    # The bag's own /tf_static places each cloud by its frame id (ingest.extrinsics, shared with the pipeline).
    tf_topics = {T.TF_STATIC} & set(topic_types) if ingest.extrinsics is not None else set()
    wanted |= tf_topics
    period = 1.0 / rate_hz
    next_t: float | None = None
    gt: dict[str, tuple[float, Any]] = {}
    pending = _Pending(resets=ingest.sync.resets)
    for m in reader.messages(wanted):
        fed = m.topic in sensor_of or m.topic in gt_topics
        if m.topic in tf_topics:
            yield _TF, m.msg
        if next_t is None:
            if not fed:  # a copied-only topic does not start the clock (same cycle times as without it)
                if m.topic in copied:
                    yield _COPY, m
                continue
            next_t = m.stamp_sec + period  # first cycle one period after the first message
        while m.stamp_sec >= next_t:
            yield _CYCLE, _cycle(next_t, ingest, pending, gt, ahead)
            next_t += period
        if m.topic in copied:
            yield _COPY, m
        sensor = sensor_of.get(m.topic)
        if sensor is not None:
            accepted, stamp = _offer(ingest, sensor, m.msg, m.stamp_sec, pending)
            if accepted and clock is not None and stamp is not None:
                clock.note(sensor, m.stamp_sec, stamp)
        elif m.topic in gt_topics:
            gt[m.topic] = (m.stamp_sec, m.msg)
    if next_t is not None:
        yield _CYCLE, _cycle(next_t, ingest, pending, gt, ahead)


def _cycle(t: float, ingest: SensorIngest, pending: _Pending, gt: dict[str, tuple[float, Any]],
           ahead: Callable[[Snapshot], None] | None) -> BagCycle:
    """The cycle at bag time ``t`` [s]: the sync's snapshot with its frames decoded, and the ground truth."""
    snap = _resolved(ingest.sync.snapshot(t), ingest, pending)
    if ahead is not None:
        ahead(snap)
    return BagCycle(t, snap, dict(gt))
