"""``lmm-fusion replay``: recorded bags through the node's pipeline, offline and deterministic.

Messages are read in recorded order (rosbag2, MCAP or SQLite3, through rosbags) and fed through the
node's decode path (:class:`~lmm_fusion.cycle.ingest.SensorIngest`) into its
:class:`~lmm_fusion.cycle.sync.SensorSync`; every ``1/rate_hz`` seconds of *bag* time
(:func:`~lmm_fusion.cycle.bagfeed.iter_cycles`) one :meth:`FusionPipeline.cycle` runs, as fast as the machine
allows. Nothing depends on wall-clock time except the latency and throughput figures, so the same bag,
model and CPU backend give the same output bag byte for byte.

Writes to ``--out DIR``:

* ``outputs.mcap`` + ``metadata.yaml``: a rosbag2 folder (``ros2 bag play DIR``; Foxglove opens the
  ``.mcap``) with the node's output topics (:data:`OUTPUT_TOPICS`, stamped with the cycle's bag time)
  and the small inputs needed to view them (:data:`VIEW_TOPICS`: ``/tf_static``, camera info, ground
  truth). The camera, LiDAR and GNSS messages stay in the input bags, which the output refers to
  (``metadata.yaml`` ``custom_data`` ``lmm_fusion.input_bags``, ``metrics.json`` ``outputs.input_bags``):
  play or open both together. ``copy_sensors`` (``--copy-sensors``) copies them in as well, as recorded.
* ``metrics.json``: frames, cycles, per-stage latency p50/p99 [ms], throughput (× real time) and, when
  the bag has ground truth, accuracy overall, per scenario family and per time window
  (:mod:`lmm_fusion.groundtruth.scoring`); ``warnings`` (only when there are any) per sensor, what leaves
  its frames unused or suspect without a rejection: a CameraInfo of another size than the images (the
  camera is still used, as on the node), stamps far from the bag time (an unsynchronised sensor clock:
  accepted, then masked as too old in every cycle).
* with ``--render``: ``replay.mp4``, ``keyframes/*.png`` and ``timeline.png`` (:mod:`lmm_fusion.offline.render`).

A damaged bag (truncated, corrupt, no ``metadata.yaml``, not a bag) raises
:class:`~lmm_fusion.io.bags.BagError` naming the file, after the cycles read before the damage were written:
``outputs.mcap`` is closed and valid and ``metrics.json`` says why it ended early (``ended_early``); the
command exits with status 1. So does a bag with no messages (or none of a sensor or ground truth): there
is nothing to replay. Several topics of one sensor's type with none of the default names are refused
(``ValueError`` listing them, exit status 2) unless exactly one is usable, e.g. the colour image next to
a 16-bit depth one (:func:`~lmm_fusion.cycle.bagfeed.detect_sensor_topics`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmm_fusion.base import topics as T
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig, VehicleGeometry, load_rig
from lmm_fusion.base.topics import NODE_NAME  # the node's ``~/...`` publishers live under ``/<NODE_NAME>/``
from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.cycle.bagfeed import (
    GROUND_TRUTH_TOPICS,
    ClockCheck,
    detect_sensor_topics,
    first_message,
    iter_cycles,
)
from lmm_fusion.cycle.extrinsics import ExtrinsicsError
from lmm_fusion.cycle.ingest import SensorIngest
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.sync import SensorSync, Snapshot
from lmm_fusion.groundtruth.messages import GroundTruth, ground_truth_from_messages
from lmm_fusion.groundtruth.scoring import Sample, accuracy_table, grouped_tables, sample_of, window_key
from lmm_fusion.io.bags import BagError, BagMessage, BagReader, BagWriter
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.image import read_image
from lmm_fusion.io.msgtypes import rosbags_types
from lmm_fusion.io.tf import tf_static_msg
from lmm_fusion.offline.render import CycleRecord, VideoRenderer, compose_frame, timeline_plot
from lmm_fusion.ros import outputs as ro
from lmm_fusion.runtime.base import BACKENDS

log = logging.getLogger(__name__)

#: Output kind -> topic, exactly as the node publishes them (``~/scene_assessment`` etc.).
OUTPUT_TOPICS: dict[str, str] = {
    "scene": f"/{NODE_NAME}/scene_assessment",
    "action": f"/{NODE_NAME}/action_suggestion",
    "occupancy": f"/{NODE_NAME}/occupancy",
    "markers": f"/{NODE_NAME}/markers",
}
#: Input topics copied into the output bag (when present) so the outputs can be viewed in context.
VIEW_TOPICS: tuple[str, ...] = (T.TF_STATIC, T.CAMERA_INFO, *GROUND_TRUTH_TOPICS)
#: Ground truth older than this at the cycle time [s] is not used to score the cycle.
GT_MAX_AGE = 0.5
OUTPUT_BAG = "outputs"
LATENCY_STAGES: tuple[str, ...] = ("preprocess", "inference", "decode", "safety", "total", "write", "render")


@dataclass
class ReplayOptions:
    """What :func:`replay` does. ``sensor_topics`` maps sensor -> topic (others auto-detected by type);
    ``window_s`` [s] is the width of the accuracy-over-time windows; ``keyframe_every_s`` [s] the key
    frame spacing of ``--render``; ``threads`` the backend's CPU threads (None = 1 with ``prefetch``, else the
    backend's default);
    ``copy_sensors`` True also copies the camera, LiDAR and GNSS messages into the output bag (False, the
    default: it refers to the input bags instead; ``/tf_static``, camera info and ground truth are copied
    either way); ``prefetch`` > 0 reads and decodes the bag in a background thread that many events ahead
    of the cycles (:func:`~lmm_fusion.cycle.bagfeed.iter_cycles`; same results, 0 = in line); ``on_cycle``,
    when given, is called after every cycle with (bag time [s], the cycle's snapshot, its assessment, its
    ground truth or None, the pipeline): the per-cycle view of the fleet replay and model comparison."""

    model_dir: str | Path | None = None
    backend: str = "auto"
    rate_hz: float = 10.0
    render: bool = False
    sensor_topics: dict[str, str] = field(default_factory=dict)
    window_s: float = 10.0
    keyframe_every_s: float = 5.0
    threads: int | None = None
    progress: bool = True
    rig: SensorRig | None = None
    copy_sensors: bool = False
    prefetch: int = 16
    on_cycle: Callable[[float, Snapshot, Assessment, GroundTruth | None, FusionPipeline], None] | None = None


def bag_time_range(paths: Sequence[Path]) -> tuple[float, float]:
    """(first, last) recorded time [s] over the bags (from their index; 0, 0 for empty bags)."""
    with BagReader(paths) as reader:
        return reader.time_range or (0.0, 0.0)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    v = np.asarray(values, np.float64)
    return {
        "p50": round(float(np.percentile(v, 50)), 3),
        "p99": round(float(np.percentile(v, 99)), 3),
        "mean": round(float(v.mean()), 3),
    }


class _OutputBag:
    """The replay's output rosbag2: written to a staging folder, then moved so that ``DIR/outputs.mcap``
    is the MCAP file and ``DIR/metadata.yaml`` makes ``DIR`` itself a rosbag2 folder."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.staging = out_dir / OUTPUT_BAG
        for stale in (self.staging, out_dir / f"{OUTPUT_BAG}.mcap", out_dir / "metadata.yaml"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        self.writer = BagWriter(self.staging, storage="mcap")
        self.writer.__enter__()

    def close(self) -> Path:
        self.writer.close()
        final = self.out_dir / f"{OUTPUT_BAG}.mcap"
        (self.staging / f"{OUTPUT_BAG}.mcap").rename(final)
        (self.staging / "metadata.yaml").rename(self.out_dir / "metadata.yaml")
        self.staging.rmdir()
        return final


def _record(a: Assessment, gt: GroundTruth | None) -> CycleRecord:
    return CycleRecord(
        t=a.stamp,
        valid=a.valid,
        degraded=a.degraded,
        risk=int(a.risk),
        action=int(a.action),
        target_speed=float(a.target_speed),
        ego_speed=a.ego_speed,
        attention=tuple(float(m.attention) for m in a.modalities),
        override=a.safety_override,
        gt_risk=None if gt is None or gt.risk is None else int(gt.risk),
        gt_action=None if gt is None or gt.action is None else int(gt.action),
        gt_target_speed=None if gt is None else gt.target_speed,
        gt_ego_speed=None if gt is None else gt.ego_speed,
    )


@dataclass
class _Input:
    """The opened bags: what they hold, or the error that made them unreadable (then empty)."""

    reader: BagReader
    error: BagError | None
    open_s: float  # [s] opening reads the bag's index: counted in the wall time
    topic_types: dict[str, str]
    sensor_of: dict[str, str]  # topic -> sensor
    duration: float  # [s] from the index


def _open_input(bags: list[Path], opts: ReplayOptions) -> _Input:
    reader = BagReader(bags)
    error: BagError | None = None
    t0 = time.perf_counter()
    try:
        reader.open()
    except BagError as exc:  # nothing readable: still write an (empty) output bag and metrics.json
        error = exc  # raised after the (empty) outputs are written; the caller reports it
    open_s = time.perf_counter() - t0
    topic_types = reader.topics
    sensor_of = detect_sensor_topics(topic_types, opts.sensor_topics or None,
                                     lambda t: first_message(reader, t)) if error is None else {}
    missing = sorted(set(MODALITIES) - set(sensor_of.values()))
    if missing and error is None:
        log.warning("no topic for %s in the bag: replaying with %s masked", ", ".join(missing), ", ".join(missing))
    start, end = reader.time_range or (0.0, 0.0)
    return _Input(reader, error, open_s, topic_types, sensor_of, max(end - start, 0.0))


@dataclass
class _Tally:
    """What the cycles of a replay add up to."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in LATENCY_STAGES})
    samples: list[Sample] = field(default_factory=list)
    records: list[CycleRecord] = field(default_factory=list)
    cycles: int = 0
    valid: int = 0
    degraded: int = 0
    overrides: int = 0
    first_t: float | None = None
    last_t: float | None = None

    def add(self, a: Assessment, gt: GroundTruth | None, t: float) -> None:
        for stage, ms in a.latency_ms.items():
            self.latencies.setdefault(stage, []).append(ms)
        if gt is not None:
            self.samples.append(sample_of(a, gt, t=t))
        self.records.append(_record(a, gt))
        self.cycles += 1
        self.valid += a.valid
        self.degraded += a.degraded
        self.overrides += a.safety_override
        self.last_t = t


def _write_outputs(writer: BagWriter, types: Any, a: Assessment, t: float,
                   vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> None:
    """The node's four output messages of one cycle, at bag time ``t`` [s] (markers drawn for ``vehicle``)."""
    writer.write(OUTPUT_TOPICS["scene"], t, ro.scene_assessment(types, a))
    writer.write(OUTPUT_TOPICS["action"], t, ro.action_suggestion(types, a))
    writer.write(OUTPUT_TOPICS["occupancy"], t, ro.occupancy_grid(types, a))
    writer.write(OUTPUT_TOPICS["markers"], t, ro.markers(types, a, vehicle=vehicle))


def _lidar_in_base(snapshot: Snapshot, pipeline: FusionPipeline) -> np.ndarray | None:
    """The snapshot's LiDAR points ``(N, 3)`` in ``base_link`` [m], for rendering (by the cloud's own frame
    id, as the pipeline placed them); None without a cloud or when its frame has no transform."""
    lidar = snapshot.frames.get("lidar")
    if lidar is None:
        return None
    try:
        return pipeline.extrinsics.to_base(np.asarray(lidar, np.float32)[:, :3],
                                           snapshot.frame_ids.get("lidar") or T.LIDAR_FRAME)
    except ExtrinsicsError:
        return None


def _ended_early(error: BagError | None) -> dict[str, Any] | None:
    """None when every bag was read to its end; else which file stopped the replay, and why."""
    if error is None:
        return None
    return {"bag": str(error.path), "reason": error.reason, "messages_read": error.messages_read,
            "last_stamp_s": error.last_stamp, "error": str(error)}


def _timing(tally: _Tally, wall: float, duration: float) -> dict[str, Any]:
    lat = tally.latencies
    return {
        "wall_s": round(wall, 3),
        "throughput_x_realtime": round(duration / wall, 3) if wall > 0 else None,
        "cycles_per_s": round(tally.cycles / wall, 2) if wall > 0 else None,
        # The rest of the wall time: reading, deserialising, decoding and copying the inputs, as far as the
        # reading thread (ReplayOptions.prefetch) did not hide them behind the cycles.
        "read_decode_copy_s": round(wall - sum(sum(lat[k]) for k in ("total", "write", "render")) / 1e3, 3),
        "latency_ms": {s: _percentiles(v) for s, v in lat.items() if v},
    }


def _accuracy(tally: _Tally, window_s: float) -> dict[str, Any]:
    """Overall, per scenario family and per time window (:mod:`lmm_fusion.groundtruth.scoring`)."""
    t0 = tally.first_t if tally.first_t is not None else 0.0
    return {
        "overall": accuracy_table(tally.samples),
        "per_scenario": grouped_tables(tally.samples, lambda x: x.scenario),
        "per_window": {"window_s": window_s, "windows": grouped_tables(tally.samples, window_key(t0, window_s))},
    }


def _timeline(tally: _Tally, renderer: VideoRenderer, pipeline: FusionPipeline, bags: list[Path],
              out: Path) -> dict[str, Any]:
    # The model's folder name, not its path: the plot is shared (docs, reports) beyond this machine.
    model = f"model {Path(pipeline.model_dir).name}" + (" (random init)" if pipeline.random_model else "")
    title = f"{', '.join(b.name for b in bags)} — {pipeline.backend.describe()}, {model}"
    timeline = timeline_plot(tally.records, out / "timeline.png", title=title)
    return {"video": str(renderer.video_path), "frames": renderer.frames,
            "keyframes": [str(p) for p in renderer.keyframes], "timeline": str(timeline)}


def _camera_info_topic(topic_types: dict[str, str], camera_topic: str) -> str | None:
    """The CameraInfo topic of ``camera_topic``: the one in its namespace, else the default one, else the
    only one in the bag (None when that leaves no single candidate)."""
    infos = sorted(t for t, ty in topic_types.items() if ty == "sensor_msgs/msg/CameraInfo")
    ns = camera_topic.removesuffix("/compressed").rsplit("/", 1)[0]
    for t in (f"{ns}/camera_info", T.CAMERA_INFO):
        if t in infos:
            return t
    return infos[0] if len(infos) == 1 else None


def _camera_info_check(src: _Input) -> str | None:
    """A warning when the bag's CameraInfo does not match the size of its first camera image (None when
    they match or either is missing). As on the node, the camera is still used: the model needs only
    the pixels, but the calibration published is not the one of this camera."""
    camera = next((t for t, s in src.sensor_of.items() if s == "camera"), None)
    info_topic = _camera_info_topic(src.topic_types, camera) if camera is not None else None
    if camera is None or info_topic is None:
        return None
    info, msg = first_message(src.reader, info_topic), first_message(src.reader, camera)
    if info is None or msg is None:
        return None
    try:
        h, w = read_image(msg).shape[:2]
    except MessageError:
        return None  # counted as a rejected frame by the replay itself
    if (w, h) == (int(info.width), int(info.height)):
        return None
    return (f"camera: image {w}x{h} ({camera}) does not match camera_info {info.width}x{info.height} "
            f"({info_topic}); the camera is used")


def _checked_bags(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    bags = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not bags:
        raise ValueError("bags: need at least one rosbag2 folder")
    for b in bags:
        if not b.exists():
            raise FileNotFoundError(f"bag {str(b)!r} does not exist")
    return bags


def replay(
    paths: Path | str | Sequence[Path | str], out_dir: Path | str, options: ReplayOptions | None = None
) -> dict[str, Any]:
    """Replay ``paths`` (one or more rosbag2 folders) into ``out_dir``; returns the metrics dict that is
    also written to ``out_dir/metrics.json`` (see the module docstring)."""
    opts = options or ReplayOptions()
    bags = _checked_bags(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rig = opts.rig or SensorRig()
    src = _open_input(bags, opts)
    error = src.error
    # Per sensor: what makes its frames unused or suspect without a rejection (metrics.json "warnings").
    warnings: dict[str, list[str]] = {}
    info_warning = _camera_info_check(src) if error is None else None
    if info_warning is not None:
        log.warning("replay: %s", info_warning)
        warnings.setdefault("camera", []).append(info_warning)
    has_gt = any(t in src.topic_types for t in GROUND_TRUTH_TOPICS)

    # With the reading thread on (prefetch), the backend gets one thread by default: the reader takes the
    # other core of a 2-core machine, and two inference threads contending with it were measured slower
    # (`lmm-fusion bench --stage replay`: 10.0x vs 9.6x real time, raw 1280x720 drive, one run each).
    threads = opts.threads if opts.threads is not None else (1 if opts.prefetch > 0 else None)
    pipeline = FusionPipeline(opts.model_dir, backend=opts.backend, rig=rig, threads=threads)
    pipeline.warmup()
    # The bag's /tf_static (fed by iter_cycles) places each cloud by its own frame id; without one, the
    # rig's mounts place the project's own frames (pipeline.extrinsics falls back to them).
    ingest = SensorIngest(SensorSync(), rig, extrinsics=pipeline.extrinsics, preprocessor=pipeline.preprocessor)
    types = rosbags_types()
    bag = _OutputBag(out)
    # The output bag refers to its inputs rather than copying their sensors (unless copy_sensors): absolute
    # paths, so a player, Foxglove or a report finds them from anywhere.
    input_refs = [str(b.resolve()) for b in bags]
    bag.writer.set_custom_data("lmm_fusion.input_bags", json.dumps(input_refs))
    bag.writer.set_custom_data("lmm_fusion.sensors_copied", "true" if opts.copy_sensors else "false")
    copied = (set(src.sensor_of) if opts.copy_sensors else set()) | set(VIEW_TOPICS)
    wrote_tf = T.TF_STATIC in src.topic_types

    def copy_input(m: BagMessage) -> None:
        if m.raw is not None:  # recorded bytes as they are: no deserialising and serialising again
            bag.writer.write_raw(m.topic, m.stamp_sec, m.msgtype, m.raw)
        else:
            bag.writer.write(m.topic, m.stamp_sec, m.msg)

    renderer = VideoRenderer(out, fps=opts.rate_hz, keyframe_every_s=opts.keyframe_every_s) if opts.render else None
    tally = _Tally()
    # iter_cycles emits one cycle per period after the first message, plus a final one.
    expected = math.floor(src.duration * opts.rate_hz) + 1 if src.duration > 0 else None
    bar = tqdm(total=expected, unit="cycle", desc="replay", disable=not opts.progress, file=sys.stderr,
               dynamic_ncols=True)
    wall0 = time.perf_counter()
    clock = ClockCheck(dict(ingest.sync.config.timeouts))
    cycle_iter = iter(()) if error is not None else iter_cycles(
        src.reader, ingest, opts.rate_hz, sensor_topics={s: t for t, s in src.sensor_of.items()},
        with_ground_truth=has_gt, clock=clock,
        passthrough=sorted(copied), on_passthrough=copy_input, prefetch=opts.prefetch,
        # The camera image resized and normalised in the reading thread, ahead of its cycle (same bits).
        ahead=lambda snap: pipeline.preprocessor.prepare_image(snap.frames.get("camera")))
    try:
        for c in cycle_iter:
            if tally.first_t is None:
                tally.first_t = c.t
                if not wrote_tf:  # RViz needs the sensor frames to place the points and image
                    bag.writer.write(T.TF_STATIC, c.t, tf_static_msg(types, rig, c.t))
                    wrote_tf = True
            a = pipeline.cycle(c.snapshot)
            t0 = time.perf_counter()
            _write_outputs(bag.writer, types, a, c.t, rig.vehicle)
            t1 = time.perf_counter()
            tally.latencies["write"].append((t1 - t0) * 1e3)
            gt_msgs = {k: v for k, v in c.ground_truth.items() if c.t - v[0] <= GT_MAX_AGE}
            gt = ground_truth_from_messages(gt_msgs) if gt_msgs else None
            tally.add(a, gt, c.t)
            if opts.on_cycle is not None:
                opts.on_cycle(c.t, c.snapshot, a, gt, pipeline)
            if renderer is not None:
                pts = _lidar_in_base(c.snapshot, pipeline)
                renderer.add(compose_frame(c.snapshot.frames.get("camera"), pts, a, gt, c.t - tally.first_t,
                                           rig.vehicle), c.t)
                tally.latencies["render"].append((time.perf_counter() - t1) * 1e3)
            bar.update(1)
    except BagError as exc:  # keep what was read: close the output bag, write metrics, then raise
        error = exc
        log.warning("replay: the bag ended early; outputs.mcap and metrics.json keep the %d cycles before it",
                    tally.cycles)
    finally:
        src.reader.close()
        bar.close()
        if renderer is not None:
            renderer.close()
        bag_path = bag.close()
    if error is None and tally.cycles == 0:  # nothing to replay is an error, not "0 cycles"
        held = sum(src.reader.counts.values())
        error = BagError(bags[0], "the bag holds no messages" if held == 0 else
                         f"no sensor or ground-truth messages among its {held} (topics: {sorted(src.topic_types)})")
    wall = time.perf_counter() - wall0 + src.open_s
    duration = src.duration
    if error is not None or src.reader.salvaged:  # no (trustworthy) index: the span actually replayed
        first, last = tally.first_t, tally.last_t
        duration = 0.0 if first is None or last is None else last - first + 1.0 / opts.rate_hz

    counters = ingest.sync.counters()
    metrics: dict[str, Any] = {
        "bags": [str(b) for b in bags],
        "model": str(pipeline.model_dir),
        "random_model": pipeline.random_model,
        "backend": pipeline.backend.describe(),
        "rate_hz": opts.rate_hz,
        "sensor_topics": {s: t for t, s in sorted(src.sensor_of.items(), key=lambda kv: kv[1])},
        "bag_duration_s": round(duration, 3),
        "ended_early": _ended_early(error),
        "frames": {s: {"received": counters[s].received, "accepted": int(ingest.stats.accepted[s]),
                       "rejected": int(ingest.stats.rejected[s]),
                       # why the latest rejected message was refused (names the field and value)
                       **({"last_error": ingest.stats.last_error[s]} if s in ingest.stats.last_error else {})}
                   for s in MODALITIES},
        "cycles": {"total": tally.cycles, "valid": tally.valid, "degraded": tally.degraded,
                   "safety_override": tally.overrides},
        "outputs": {"bag": str(bag_path), "messages": dict(sorted(bag.writer.counts.items())),
                    "sensors_copied": opts.copy_sensors, "input_bags": input_refs},
        "timing": _timing(tally, wall, duration),
    }
    for sensor, why in clock.mismatches().items():  # frames accepted, then masked as too old: say why
        log.warning("replay: %s: %s", sensor, why)
        warnings.setdefault(sensor, []).append(why)
    if warnings:
        metrics["warnings"] = dict(sorted(warnings.items()))
    if pipeline.frame_errors:  # clouds whose frame had no transform to base_link (LiDAR masked), per reason
        metrics["frame_errors"] = dict(sorted(pipeline.frame_errors.items()))
    if tally.samples:
        metrics["accuracy"] = _accuracy(tally, opts.window_s)
    if renderer is not None:
        metrics["render"] = _timeline(tally, renderer, pipeline, bags, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    if error is not None:
        raise error
    return metrics


#: Keys of metrics.json that depend on wall-clock time or the machine (excluded from determinism checks).
WALL_CLOCK_KEYS: tuple[str, ...] = ("timing",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="rosbag2 folders (MCAP or SQLite3)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="model folder (default: shipped models/fusion_small, else a random model)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="inference backend (default auto; use a CPU backend for bit-identical reruns)",
    )
    p.add_argument("--rate-hz", type=float, default=10.0, help="cycle rate in bag time [Hz] (default 10)")
    p.add_argument("--render", action="store_true", help="write replay.mp4, key-frame PNGs and timeline.png")
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    p.add_argument(
        "--camera-topic", default=None, help="camera topic (Image or CompressedImage; default: by type)"
    )
    p.add_argument("--lidar-topic", default=None, help="LiDAR topic (PointCloud2; default: by type)")
    p.add_argument("--gnss-topic", default=None, help="GNSS topic (NavSatFix; default: by type)")
    p.add_argument("--odometry-topic", default=None,
                   help="ego-speed topic (Odometry or TwistWithCovarianceStamped; default: by type, not ground truth)")
    p.add_argument("--window-s", type=float, default=10.0, help="accuracy-over-time window [s] (default 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the backend")
    p.add_argument("--rig", type=Path, default=None, metavar="FILE",
                   help="rig file (YAML, docs/rig_file.md): vehicle geometry for the guard and markers, mounts for "
                        "frames the bag's /tf_static lacks, LiDAR intensity scale (default: the built-in rig)")
    p.add_argument(
        "--copy-sensors",
        action="store_true",
        help="also copy the camera/LiDAR/GNSS messages into outputs.mcap (default: it refers to the input bags)",
    )
    p.add_argument(
        "--no-sensors",
        action="store_true",
        help="leave the camera/LiDAR/GNSS messages out of outputs.mcap (the default; kept for old scripts)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _summary(m: dict[str, Any]) -> str:
    c, tm = m["cycles"], m["timing"]
    lat = tm["latency_ms"].get("total", {})
    lines = [
        f"replayed {m['bag_duration_s']:.1f} s of bag: {c['total']} cycles ({c['valid']} valid, "
        f"{c['degraded']} degraded) in {tm['wall_s']:.1f} s = {tm['throughput_x_realtime']}x real time",
        f"cycle latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; backend {m['backend']}",
        f"outputs: {m['outputs']['bag']}",
    ]
    acc = m.get("accuracy", {}).get("overall")
    if acc:
        lines.append(
            f"accuracy: action {acc['action_accuracy']}, risk {acc['risk_accuracy']}, light "
            f"{acc['light_accuracy']}, speed MAE {acc['target_speed_mae']} m/s, occupancy IoU "
            f"{acc['occupancy_iou']}"
        )
        lines.append(  # the published (guarded) action next to the network's own, on the caution scale
            f"action published / model: agreement {acc['action_accuracy']} / {acc['model_action_accuracy']}, "
            f"unsafe {acc['action_unsafe_rate']} / {acc['model_action_unsafe_rate']}, over-cautious "
            f"{acc['action_over_cautious_rate']} / {acc['model_action_over_cautious_rate']}"
        )
    if "render" in m:
        lines.append(
            f"video: {m['render']['video']} ({m['render']['frames']} frames), timeline: "
            f"{m['render']['timeline']}"
        )
    return "\n".join(lines)


def options_from_args(args: argparse.Namespace, progress: bool | None = None) -> ReplayOptions:
    """The :class:`ReplayOptions` of replay's command line (:func:`add_arguments`); raises ValueError for a
    bad ``--rig`` file. ``progress`` overrides ``--no-progress`` (a fleet's tasks draw no bars)."""
    topics = {
        s: t
        for s, t in (("camera", args.camera_topic), ("lidar", args.lidar_topic), ("gnss", args.gnss_topic),
                     ("odometry", args.odometry_topic))
        if t
    }
    return ReplayOptions(
        rig=load_rig(args.rig) if args.rig is not None else None,
        model_dir=args.model,
        backend=args.backend,
        rate_hz=args.rate_hz,
        render=args.render,
        sensor_topics=topics,
        window_s=args.window_s,
        threads=args.threads,
        progress=not args.no_progress if progress is None else progress,
        copy_sensors=args.copy_sensors and not args.no_sensors,
    )


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        log.error("replay: %s", exc)
        return 2
    try:
        metrics = replay(args.bags, args.out, opts)
    except BagError as exc:  # partial outputs and metrics.json ("ended_early") are in --out
        log.error("replay: %s; partial outputs in %s", exc, args.out)
        if args.json and (args.out / "metrics.json").is_file():
            print((args.out / "metrics.json").read_text(), end="")
        return 1
    except (FileNotFoundError, ValueError) as exc:
        log.error("replay: %s", exc)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(_summary(metrics))
    return 0


__all__ = [
    "OUTPUT_TOPICS",
    "VIEW_TOPICS",
    "WALL_CLOCK_KEYS",
    "ReplayOptions",
    "add_arguments",
    "options_from_args",
    "replay",
    "run",
]
