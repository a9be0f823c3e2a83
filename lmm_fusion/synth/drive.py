"""``lmm-fusion synth``: synthesise a drive of the synthetic world into a rosbag2 with ground truth.

Sensors run at their own rates with their own stamps, like on a vehicle: camera 20 Hz (phase
+12 ms, +-0.5 ms jitter), LiDAR 10 Hz (phase 0, +-0.2 ms jitter), GNSS 10 Hz (phase +37 ms).
Ground truth is written at every LiDAR frame, stamped with that frame's stamp. ``/tf_static``
comes first. Each message's bag timestamp equals its header stamp. Sim time starts at
:data:`START_TIME`; no wall-clock time enters the bag, so a seed fixes the bytes.

Random streams are split from one ``SeedSequence(seed)``: the world (scene and ego motion) has
its own, so changing the camera size or LiDAR beams never changes the drive itself.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmm_fusion.base import topics
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig, load_rig
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.groundtruth.messages import ground_truth_msgs
from lmm_fusion.io.bags import BagWriter
from lmm_fusion.io.common import make_header
from lmm_fusion.io.gnss import create_fix
from lmm_fusion.io.image import create_compressed_image, create_image
from lmm_fusion.io.msgtypes import MsgTypes, rosbags_types
from lmm_fusion.io.pointcloud import create_cloud
from lmm_fusion.io.tf import tf_static_msg
from lmm_fusion.synth.camera import CameraRenderer, camera_info_arrays
from lmm_fusion.synth.gnss import GnssSimulator, parse_origin, rig_at_origin
from lmm_fusion.synth.lidar import LidarSimulator, driver_points
from lmm_fusion.synth.world import World

log = logging.getLogger(__name__)

#: Sim time of the first sample [s since the epoch] (fixed: bags must not depend on the wall clock).
START_TIME = 1_700_000_000.0
CAMERA_PHASE = 0.012
CAMERA_JITTER = 0.0005
LIDAR_PHASE = 0.0
LIDAR_JITTER = 0.0002
GNSS_PHASE = 0.037
JPEG_QUALITY = 90
#: Seconds of sensor data recorded before the first label of a drive that starts mid-world: covers
#: the GNSS motion estimator's window and the LiDAR history lag of the shipped model.
DEFAULT_WARMUP = 1.0


# ---------------------------------------------------------------------------- message builders
def camera_info_msg(types: MsgTypes, rig: SensorRig, header: Any) -> Any:
    """sensor_msgs/CameraInfo of the rig camera (plumb_bob, zero distortion)."""
    a = camera_info_arrays(rig)
    return types.CameraInfo(
        header=header, height=rig.camera.height, width=rig.camera.width, distortion_model="plumb_bob",
        d=a["d"], k=a["k"], r=a["r"], p=a["p"], binning_x=0, binning_y=0,
        roi=types.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


# ---------------------------------------------------------------------------- drive
@dataclass
class SynthStats:
    """What a synthesis did: message counts per topic and CPU seconds per stage."""

    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)

    def add_time(self, key: str, dt: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + dt


def sensor_schedule(seconds: float, rig: SensorRig, rng: np.random.Generator) -> list[tuple[float, str]]:
    """(stamp, sensor) events of a drive, in time order (sensor: "camera", "lidar", "gnss")."""
    events: list[tuple[float, str]] = []
    for name, rate, phase, jitter in (("lidar", rig.lidar.rate_hz, LIDAR_PHASE, LIDAR_JITTER),
                                      ("gnss", rig.gnss.rate_hz, GNSS_PHASE, 0.0),
                                      ("camera", rig.camera.rate_hz, CAMERA_PHASE, CAMERA_JITTER)):
        n = math.floor((seconds - phase) * rate - 1e-9) + 1 if seconds > phase else 0
        t = phase + np.arange(max(n, 0)) / rate
        if jitter > 0:
            t = t + np.clip(rng.standard_normal(t.shape) * jitter, -3 * jitter, 3 * jitter)
        # whole microseconds: stamps read back identically from header and bag index
        events += [(round(max(float(tt), 0.0), 6), name) for tt in t]
    order = {"lidar": 0, "gnss": 1, "camera": 2}
    events.sort(key=lambda e: (e[0], order[e[1]]))
    return events


def synthesize(out: Path, seconds: float, seed: int, scenarios: Sequence[Scenario] | None = None,
               rig: SensorRig | None = None, compressed: bool = False, storage: str = "mcap",
               progress: bool = True, start: float = 0.0, warmup: float = DEFAULT_WARMUP,
               lamp_cues: bool = True) -> Path:
    """Write a ``seconds`` long drive to the rosbag2 folder ``out`` (must not exist) and return it.

    ``scenarios`` are cycled episode by episode (default: every family); ``rig`` defaults to
    :class:`SensorRig`; ``compressed`` writes JPEG ``CompressedImage`` instead of raw ``Image``.
    ``start`` [s]: world time at which the labelled part begins (the world runs unrecorded before);
    the sensors are recorded from ``max(0, start - warmup)`` on without ground truth, so a consumer's
    motion estimate and LiDAR history are warm at the first label, as on a vehicle that has been
    driving. ``start = 0`` is a drive that begins with its first episode (cold sensors).
    ``lamp_cues``: the world's turn signals and lamp rules (:class:`~lmm_fusion.synth.world.World`).
    """
    return synthesize_with_stats(out, seconds, seed, scenarios, rig, compressed, storage, progress, start,
                                 warmup, lamp_cues)[0]


def synthesize_with_stats(out: Path, seconds: float, seed: int, scenarios: Sequence[Scenario] | None = None,
                          rig: SensorRig | None = None, compressed: bool = False, storage: str = "mcap",
                          progress: bool = True, start: float = 0.0,
                          warmup: float = DEFAULT_WARMUP, lamp_cues: bool = True) -> tuple[Path, SynthStats]:
    """:func:`synthesize`, also returning :class:`SynthStats` (counts, per-stage CPU time)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    if not (start >= 0 and math.isfinite(start)):
        raise ValueError(f"start must be a finite number >= 0 [s], got {start!r}")
    if not (warmup >= 0 and math.isfinite(warmup)):
        raise ValueError(f"warmup must be a finite number >= 0 [s], got {warmup!r}")
    warm = min(warmup, start)
    first = start - warm  # world time of the first recorded message
    rig = rig or SensorRig()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output bag {out} exists already; remove it or choose another path")
    types = rosbags_types()
    seq = np.random.SeedSequence(int(seed))
    world_ss, cam_ss, lidar_ss, gnss_ss, stamp_ss = seq.spawn(5)
    world = World(np.random.default_rng(world_ss), scenarios, t0=0.0, lamp_cues=lamp_cues, vehicle=rig.vehicle)
    cam_rng, lidar_rng = np.random.default_rng(cam_ss), np.random.default_rng(lidar_ss)
    renderer = CameraRenderer(rig, noise_seed=int(np.random.default_rng(cam_ss.spawn(1)[0]).integers(2**31)))
    lidar = LidarSimulator(rig)
    gnss = GnssSimulator(rig, np.random.default_rng(gnss_ss))
    events = [(round(first + t, 6), name)
              for t, name in sensor_schedule(warm + seconds, rig, np.random.default_rng(stamp_ss))]
    stats = SynthStats(seconds=seconds)
    last = {"camera": -math.inf, "lidar": -math.inf, "gnss": -math.inf}
    bar = None
    if progress:
        bar = tqdm(total=len(events), unit="msg", desc=f"synth {out.name} ({seconds:g} s)", leave=False)
    with BagWriter(out, storage=storage) as bag:
        bag.write(topics.TF_STATIC, START_TIME, tf_static_msg(types, rig, START_TIME))
        for t, sensor in events:
            t0 = time.perf_counter()
            world.advance(t)
            scene = world.scene()
            stats.add_time("world", time.perf_counter() - t0)
            stamp = START_TIME + t
            t0 = time.perf_counter()
            if sensor == "camera":
                rgb = renderer.render(scene, cam_rng)
                stats.add_time("camera_render", time.perf_counter() - t0)
                t0 = time.perf_counter()
                hdr = make_header(types, stamp, topics.CAMERA_FRAME)
                if compressed:
                    bag.write(topics.CAMERA_COMPRESSED, stamp,
                              create_compressed_image(types, hdr, rgb, "jpeg", JPEG_QUALITY))
                else:
                    bag.write(topics.CAMERA_IMAGE, stamp, create_image(types, hdr, rgb))
                bag.write(topics.CAMERA_INFO, stamp, camera_info_msg(types, rig, hdr))
                stats.add_time("camera_write", time.perf_counter() - t0)
            elif sensor == "lidar":
                pts = lidar.scan(scene, lidar_rng)
                stats.add_time("lidar_cast", time.perf_counter() - t0)
                t0 = time.perf_counter()
                bag.write(topics.LIDAR_POINTS, stamp,
                          create_cloud(types, make_header(types, stamp, topics.LIDAR_FRAME),
                                       driver_points(pts, rig)))
                stats.add_time("lidar_write", time.perf_counter() - t0)
                # No labels during the warm-up (the frame scheduled at ``start`` may be jittered early).
                if t >= start - 3 * LIDAR_JITTER - 1e-6:
                    t0 = time.perf_counter()
                    label = scene.label()
                    ages = [t - last[m] if math.isfinite(last[m]) else math.inf for m in ("camera", "lidar", "gnss")]
                    ages[1] = 0.0
                    for topic, msg in ground_truth_msgs(types, scene, label, stamp, ages).items():
                        bag.write(topic, stamp, msg)
                    stats.labels[label.action.name] = stats.labels.get(label.action.name, 0) + 1
                    stats.add_time("ground_truth", time.perf_counter() - t0)
            else:
                f = gnss.fix(t, scene.ego_pose)
                bag.write(topics.GNSS_FIX, stamp, create_fix(types, make_header(types, stamp, topics.GNSS_FRAME),
                                                             f.lat, f.lon, f.alt, f.status, f.covariance,
                                                             f.covariance_type))
                stats.add_time("gnss", time.perf_counter() - t0)
            last[sensor] = t
            if bar is not None:
                bar.update(1)
        stats.counts = dict(bag.counts)
    if bar is not None:
        bar.close()
    log.info("synthesised %.1f s into %s: %s", seconds, out, stats.counts)
    return out, stats


def synth_benchmark(seconds: float = 10.0, rig: SensorRig | None = None, compressed: bool = False,
                    seed: int = 0) -> dict[str, Any]:
    """Time the synthesis of ``seconds`` of drive at ``rig`` (default sensors) into a temporary bag.

    Returns wall seconds, wall and process-CPU seconds per simulated minute (extrapolated; CPU time
    is less sensitive to other load on the machine), the real-time factor (simulated / wall; > 1 is
    faster than real time), bag bytes per minute and wall seconds per stage per simulated minute.
    """
    tmp = Path(tempfile.mkdtemp(prefix="lmm_synth_bench_"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        path, stats = synthesize_with_stats(tmp / "bag", seconds, seed, rig=rig, compressed=compressed,
                                            progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scale = 60.0 / seconds
    return {"sim_seconds": seconds, "wall_seconds": wall, "seconds_per_minute": wall * scale,
            "cpu_seconds_per_minute": cpu * scale, "realtime_factor": seconds / wall,
            "bytes_per_minute": size * scale, "compressed": compressed,
            "per_stage_seconds_per_minute": {k: v * scale for k, v in sorted(stats.timings.items())}}


# ---------------------------------------------------------------------------- CLI
def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), each 16..8192."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"camera size must look like 640x360, got {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise argparse.ArgumentTypeError(f"camera size out of range 16..8192: {text!r}")
    return w, h


def parse_scenario(text: str) -> Scenario:
    try:
        return Scenario[text.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {text!r}; one of {', '.join(s.name.lower() for s in Scenario)}") from None


def rig_from_args(camera: tuple[int, int] | None = None, lidar_beams: int | None = None,
                  lidar_columns: int | None = None, base: SensorRig | None = None) -> SensorRig:
    """The default rig with the camera size and LiDAR resolution replaced where given."""
    rig = base or SensorRig()
    cam: CameraModel = rig.camera
    lid: LidarModel = rig.lidar
    if camera is not None:
        cam = replace(cam, width=camera[0], height=camera[1])
    if lidar_beams is not None:
        if not 1 <= lidar_beams <= 512:
            raise ValueError(f"lidar beams must be in 1..512, got {lidar_beams}")
        lid = replace(lid, beams=lidar_beams)
    if lidar_columns is not None:
        if not 8 <= lidar_columns <= 8192:
            raise ValueError(f"lidar columns must be in 8..8192, got {lidar_columns}")
        lid = replace(lid, columns=lidar_columns)
    return replace(rig, camera=cam, lidar=lid)


def _int_in(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} outside {lo}..{hi}")
        return v
    return parse


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lamp-cues", action=argparse.BooleanOptionalAction, default=True,
                        help="cutting-in drivers signal first, and the labels react to brake lamps and turn "
                             "signals (camera-only cues; docs/synthetic_world.md). On by default; "
                             "--no-lamp-cues gives the world without them")


def rig_from_cli(args: argparse.Namespace, camera: tuple[int, int] | None = None) -> SensorRig:
    """The rig of the sensor options: ``--rig FILE`` (or the default rig), then ``--camera``,
    ``--lidar-beams``, ``--lidar-columns`` and ``--origin`` where given (``camera``: the size used when
    neither the file nor ``--camera`` gives one). Raises ``RigFileError`` (a ValueError) for a bad file."""
    path = getattr(args, "rig", None)
    base = load_rig(path) if path is not None else None
    if camera is not None and args.camera is None and base is not None:
        camera = None  # the rig file's camera wins over a front end's default size
    rig = rig_from_args(args.camera or camera, args.lidar_beams, args.lidar_columns, base)
    return rig_at_origin(rig, args.origin)


def add_sensor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rig", type=Path, default=None, metavar="FILE",
                        help="rig file (YAML, docs/rig_file.md; e.g. config/rigs/ouster_roof.yaml): sensor mounts "
                             "(written to /tf_static), LiDAR layout and intensity unit, vehicle geometry; the "
                             "options below override it")
    parser.add_argument("--camera", type=parse_size, default=None, metavar="WxH",
                        help="camera resolution (default 1280x720)")
    parser.add_argument("--lidar-beams", type=_int_in(1, 512), default=None, metavar="N",
                        help="LiDAR beams (default 64)")
    parser.add_argument("--lidar-columns", type=_int_in(8, 8192), default=None, metavar="N",
                        help="LiDAR columns per revolution (default 2048)")
    parser.add_argument("--compressed", action="store_true", help="write JPEG CompressedImage instead of Image")
    parser.add_argument("--origin", type=parse_origin, default=None, metavar="LAT,LON[,ALT]",
                        help="geodetic position [deg, deg, m] of the map origin the drive is placed at "
                             "(default: the rig's, 48.137 N 11.576 E); write --origin=-33.87,151.21 for a "
                             "southern latitude")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output rosbag2 folder (must not exist)")
    parser.add_argument("--seconds", type=float, default=60.0, help="drive length [s] (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bag bytes)")
    parser.add_argument("--start", type=float, default=0.0,
                        help="world time [s] of the first label; the world runs unrecorded before (default 0)")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP,
                        help=f"sensor seconds recorded without labels before --start (default {DEFAULT_WARMUP:g})")
    parser.add_argument("--scenario", type=parse_scenario, action="extend", nargs="+", default=None,
                        metavar="FAMILY", help="scenario families to cycle (default all): "
                             + ", ".join(s.name.lower() for s in Scenario))
    add_world_arguments(parser)
    add_sensor_arguments(parser)
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="rosbag2 storage plugin")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        rig = rig_from_cli(args)
    except ValueError as exc:
        log.error("synth: %s", exc)
        return 2
    path, stats = synthesize_with_stats(args.out, args.seconds, args.seed, args.scenario, rig,
                                        args.compressed, args.storage, progress=not args.no_progress,
                                        start=args.start, warmup=args.warmup, lamp_cues=args.lamp_cues)
    print(f"wrote {path} ({args.storage}): " + ", ".join(f"{k} x{v}" for k, v in sorted(stats.counts.items())))
    print("action labels: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.labels.items())))
    return 0


__all__ = ["DEFAULT_WARMUP", "START_TIME", "SynthStats", "camera_info_msg", "rig_from_args", "rig_from_cli",
           "sensor_schedule",
           "synth_benchmark", "synthesize", "synthesize_with_stats"]
