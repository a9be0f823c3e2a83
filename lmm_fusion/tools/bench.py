"""``lmm-fusion bench``: time every stage of the cycle separately, and the whole cycle.

Each stage runs ``--iterations`` times after warm-up; p50/p99/max [ms] are reported with the process's
RSS. Alternatives a user would otherwise pick are timed side by side in the same run (torch eager vs
ONNX Runtime vs TensorRT; open3d's voxel grid vs the project's BEV gridding when open3d is installed)
and reported as ratios, because absolute numbers on a shared machine drift while ratios measured in
one run hold. Output is JSON (``--json`` prints it, ``--out`` writes it); ``--plot`` writes the
scaling plot (cycle time against point count and image size).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import psutil
import torch
from matplotlib.figure import Figure

from lmm_fusion.base.paths import cache_dir
from lmm_fusion.base.rig import CameraModel, SensorRig
from lmm_fusion.cycle.assessment import decode
from lmm_fusion.cycle.pipeline import FusionPipeline
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.cycle.safety import apply_guard
from lmm_fusion.cycle.sync import Snapshot
from lmm_fusion.io import (
    create_cloud,
    create_compressed_image,
    create_fix,
    create_image,
    make_header,
    read_fix,
    read_image,
    read_points,
    rosbags_types,
)
from lmm_fusion.io.gnss import EgoState
from lmm_fusion.io.pointcloud import structured_view_read
from lmm_fusion.model import ModelConfig, load_model
from lmm_fusion.offline.replay import ReplayOptions, replay
from lmm_fusion.ros import outputs as ro
from lmm_fusion.runtime.backends import BackendUnavailable, OnnxRuntimeBackend, TorchBackend, ensure_onnx
from lmm_fusion.runtime.export import example_inputs
from lmm_fusion.runtime.tensorrt import TensorRTBackend
from lmm_fusion.synth.drive import synth_benchmark, synthesize
from lmm_fusion.tools.payloads import padded_cloud_array, synthetic_image, synthetic_points

log = logging.getLogger(__name__)

STAGES = ("io", "preprocess", "model", "outputs", "cycle", "scaling", "synth", "replay")


def timeit(fn: Callable[[], Any], iterations: int, warmup: int = 3) -> dict[str, float]:
    """p50/p99/max/mean wall time of ``fn`` [ms] over ``iterations`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(samples)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "max_ms": round(float(arr.max()), 4),
        "mean_ms": round(float(arr.mean()), 4),
        "n": iterations,
    }


def rss_mib() -> float:
    """This process's resident memory [MiB]."""
    return round(psutil.Process().memory_info().rss / 2**20, 1)


# ----------------------------------------------------------------------------- stages
def bench_io(points: np.ndarray, width: int, height: int, iterations: int) -> dict[str, Any]:
    """Message -> numpy for each input type, with rosbags message objects (same readers as rclpy's)."""
    types = rosbags_types()
    header = make_header(types, 1.0, "lidar")
    xyzi = create_cloud(types, header, points, ("x", "y", "z", "intensity"))
    padded = create_cloud(types, header, padded_cloud_array(points))
    rgb = synthetic_image(width, height)
    img_rgb = create_image(types, header, rgb, "rgb8")
    img_bgr = create_image(types, header, rgb, "bgr8")
    jpeg = create_compressed_image(types, header, rgb, "jpeg", 90)
    fix = create_fix(types, header, 48.1, 11.5, 520.0, 0, [0.0025, 0, 0, 0, 0.0025, 0, 0, 0, 0.01])
    view = read_points(xyzi)
    zero_copy = bool(np.shares_memory(view, np.asarray(xyzi.data)))
    return {
        "pointcloud_xyzi_matching": {**timeit(lambda: read_points(xyzi), iterations), "zero_copy": zero_copy},
        "pointcloud_padded_48B": timeit(lambda: read_points(padded), iterations),
        "image_rgb8": timeit(lambda: read_image(img_rgb), iterations),
        "image_bgr8": timeit(lambda: read_image(img_bgr), iterations),
        "compressed_jpeg_decode": {**timeit(lambda: read_image(jpeg), iterations), "bytes": len(jpeg.data)},
        "navsatfix": timeit(lambda: read_fix(fix), iterations),
    }


def bench_preprocess(points: np.ndarray, width: int, height: int, iterations: int, cfg: Any) -> dict[str, Any]:
    """Image resize + normalise, BEV gridding and GNSS features; open3d's voxel grid beside them when installed."""
    pre = Preprocessor(cfg, SensorRig())
    rgb = synthetic_image(width, height)
    ego = EgoState(1.0, 0.0, 0.0, 0.0, 12.0, 0.5, 0.1, 0.01, 0, 0.05, True)
    out: dict[str, Any] = {
        "image_resize_normalise": timeit(lambda: pre.image(rgb), iterations),
        "bev_gridding": timeit(lambda: pre.bev(points), iterations),
        "gnss_features": timeit(lambda: pre.ego(ego), iterations),
    }
    try:
        import open3d as o3d  # optional: only for the comparison

        def voxel() -> Any:
            pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].astype(np.float64)))
            return pcd.voxel_down_sample(cfg.input_bev_grid.cell)

        out["open3d_voxel_down_sample"] = timeit(voxel, max(5, iterations // 4))
        out["ratio_open3d_over_bev_gridding"] = round(
            out["open3d_voxel_down_sample"]["p50_ms"] / out["bev_gridding"]["p50_ms"], 2
        )
    except ImportError:
        out["open3d_voxel_down_sample"] = "skipped: open3d not installed (pip install open3d-cpu==0.20.0)"
    return out


def bench_model(model_dir: Path, device: str, iterations: int, threads: int) -> dict[str, Any]:
    """Model inference per backend on identical inputs; ratios against torch eager."""
    model = load_model(model_dir)
    inputs = example_inputs(model.cfg)
    results: dict[str, Any] = {}
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("torch_eager_cpu", lambda: TorchBackend(load_model(model_dir), "cpu", threads=threads)),
        ("onnxruntime_cpu", lambda: OnnxRuntimeBackend(ensure_onnx(model_dir), threads=threads, prefer_gpu=False)),
    ]
    int8 = model_dir / "model.int8.onnx"
    if int8.is_file():
        makers.append(("onnxruntime_cpu_int8", lambda: OnnxRuntimeBackend(int8, threads=threads, prefer_gpu=False)))
    if device == "cuda":
        makers += [
            ("torch_cuda_fp32", lambda: TorchBackend(load_model(model_dir), "cuda")),
            ("torch_cuda_fp16", lambda: TorchBackend(load_model(model_dir), "cuda", "fp16")),
            ("torch_cuda_fp16_graph", lambda: TorchBackend(load_model(model_dir), "cuda", "fp16", cuda_graph=True)),
            ("onnxruntime_gpu", lambda: OnnxRuntimeBackend(ensure_onnx(model_dir), prefer_gpu=True)),
        ]
    makers.append(("tensorrt_fp16", lambda: _tensorrt(model_dir)))
    for name, make in makers:
        try:
            backend = make()
        except (BackendUnavailable, ImportError, RuntimeError) as exc:
            results[name] = f"skipped: {exc}"
            continue
        results[name] = {
            **timeit(functools.partial(backend.infer, inputs), iterations, warmup=5),
            "backend": backend.describe(),
        }
    base = results.get("torch_eager_cpu")
    if isinstance(base, dict):
        results["speedup_vs_torch_eager"] = {
            k: round(base["p50_ms"] / v["p50_ms"], 2)
            for k, v in results.items()
            if isinstance(v, dict) and "p50_ms" in v
        }
    return results


def _tensorrt(model_dir: Path) -> Any:
    return TensorRTBackend(ensure_onnx(model_dir), precision="fp16")


def _snapshot(points: np.ndarray, rgb: np.ndarray) -> Snapshot:
    ego = EgoState(1.0, 0.0, 0.0, 0.0, 12.0, 0.5, 0.1, 0.01, 0, 0.05, True)
    return Snapshot(
        now=1.0,
        frames={"camera": rgb, "lidar": points, "gnss": ego},
        ages={"camera": 0.02, "lidar": 0.05, "gnss": 0.03},
        mask=np.ones(3, bool),
        stamps={"camera": 0.98, "lidar": 0.95, "gnss": 0.97},
    )


def bench_outputs(pipeline: Any, points: np.ndarray, rgb: np.ndarray, iterations: int) -> dict[str, Any]:
    """Decode + safety guard and building every output message from one assessment."""
    snap = _snapshot(points, rgb)
    inputs = pipeline.preprocessor.inputs(snap)
    outputs = pipeline.backend.infer(inputs)
    cfg = pipeline.model_cfg
    a = pipeline.cycle(snap)
    types = rosbags_types()

    def decode_and_guard() -> Any:
        d = decode(outputs, 1.0, snap.mask, snap.ages, cfg.ttc_max, cfg.distance_max)
        return apply_guard(d, pipeline.lidar_free_distance(points), 12.0, pipeline.safety_cfg)

    def build_all() -> Any:
        return (
            ro.scene_assessment(types, a),
            ro.action_suggestion(types, a),
            ro.occupancy_grid(types, a),
            ro.markers(types, a),
        )

    return {
        "decode_and_safety": timeit(decode_and_guard, iterations),
        "lidar_free_distance": timeit(lambda: pipeline.lidar_free_distance(points), iterations),
        "build_output_messages": timeit(build_all, iterations),
    }


def bench_cycle(pipeline: Any, points: np.ndarray, width: int, height: int, iterations: int) -> dict[str, Any]:
    """End to end: sensor messages -> numpy -> snapshot -> pipeline.cycle -> output messages."""
    types = rosbags_types()
    header = make_header(types, 1.0, "lidar")
    cloud = create_cloud(types, header, padded_cloud_array(points))
    rgb = synthetic_image(width, height)
    raw = create_image(types, header, rgb, "rgb8")
    jpeg = create_compressed_image(types, header, rgb, "jpeg", 90)
    stage_ms: dict[str, list[float]] = {}

    def full(image_msg: Any) -> Any:
        snap = _snapshot(read_points(cloud), read_image(image_msg))
        a = pipeline.cycle(snap)
        for k, v in a.latency_ms.items():
            stage_ms.setdefault(k, []).append(v)
        return ro.scene_assessment(types, a), ro.action_suggestion(types, a), ro.occupancy_grid(types, a)

    out = {
        "cycle_raw_image_padded_cloud": timeit(lambda: full(raw), iterations),
        "cycle_jpeg_padded_cloud": timeit(lambda: full(jpeg), iterations),
        "pipeline_only": timeit(lambda: pipeline.cycle(_snapshot(points, rgb)), iterations),
    }
    out["pipeline_stage_p50_ms"] = {k: round(statistics.median(v), 4) for k, v in stage_ms.items()}
    return out


def bench_scaling(pipeline: Any, iterations: int) -> dict[str, Any]:
    """Cycle time (read + pipeline) against point count at 1280x720, and against image size at 120k points."""
    types = rosbags_types()
    header = make_header(types, 1.0, "lidar")

    def cycle_ms(n_points: int, w: int, h: int) -> dict[str, float]:
        cloud = create_cloud(types, header, padded_cloud_array(synthetic_points(n_points)))
        img = create_image(types, header, synthetic_image(w, h), "rgb8")
        return timeit(lambda: pipeline.cycle(_snapshot(read_points(cloud), read_image(img))), iterations)

    points_rows = [{"points": n, **cycle_ms(n, 1280, 720)} for n in (30_000, 60_000, 120_000, 240_000)]
    image_rows = [{"image": f"{w}x{h}", **cycle_ms(120_000, w, h)} for w, h in ((640, 480), (1280, 720), (1920, 1080))]
    return {"points": points_rows, "image": image_rows}


def plot_scaling(scaling: dict[str, Any], path: Path) -> None:
    """PNG of :func:`bench_scaling`: p50/p99 cycle time against point count and against image size."""
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    pts = scaling["points"]
    a.plot([r["points"] / 1000 for r in pts], [r["p50_ms"] for r in pts], "o-", label="p50")
    a.plot([r["points"] / 1000 for r in pts], [r["p99_ms"] for r in pts], "s--", label="p99")
    a.set(xlabel="LiDAR points [thousands]", ylabel="cycle [ms]", title="Cycle vs point count (1280x720)")
    img = scaling["image"]
    b.plot([r["image"] for r in img], [r["p50_ms"] for r in img], "o-", label="p50")
    b.plot([r["image"] for r in img], [r["p99_ms"] for r in img], "s--", label="p99")
    b.set(xlabel="camera image", ylabel="cycle [ms]", title="Cycle vs image size (120k points)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bench_synth(seconds: float) -> dict[str, Any]:
    """Synthesis speed of ``seconds`` of drive (:func:`lmm_fusion.synth.drive.synth_benchmark`)."""
    return synth_benchmark(seconds)


#: Stages of a replay cycle reported by ``bench_replay`` (the node's latency stages plus the bag write).
REPLAY_SPLIT = ("preprocess", "inference", "decode", "safety", "write")
#: What a replay must reach on 2 cores (bag seconds per wall second) with the default output bag.
REPLAY_TARGET_X = 10.0
#: Points of the per-message anchor clouds (``bench_replay``'s ``anchors``): an Ouster OS1-128's 1024x128.
ANCHOR_POINTS = 131_072


def _replay_drive(seconds: float, rig: SensorRig, compressed: bool) -> tuple[Path, float | None]:
    """The cached synthetic drive (seed 7) for ``rig``, synthesised on first use: (folder, synth seconds)."""
    cam, lidar = rig.camera, rig.lidar
    kind = "_jpeg" if compressed else ""
    drive = cache_dir() / (f"bench_drive_{seconds:g}s_{cam.width}x{cam.height}_{lidar.beams}x{lidar.columns}"
                           f"{kind}_seed7")
    if (drive / "metadata.yaml").is_file():  # written last: its presence means a complete bag
        return drive, None
    shutil.rmtree(drive, ignore_errors=True)
    t0 = time.perf_counter()
    synthesize(drive, seconds, seed=7, rig=rig, compressed=compressed, progress=False)
    return drive, round(time.perf_counter() - t0, 3)


def _replay_variant(drive: Path, out: Path, opts: ReplayOptions) -> dict[str, Any]:
    """One ``replay`` of ``drive`` into ``out`` (removed afterwards): its timing summary."""
    t0 = time.perf_counter()
    m = replay(drive, out, opts)
    total = time.perf_counter() - t0
    timing, n = m["timing"], m["cycles"]["total"]
    lat = timing["latency_ms"]
    split = {k: round(lat[k]["mean"] * n / 1e3, 3) for k in REPLAY_SPLIT if k in lat}
    split["read_decode_copy"] = timing["read_decode_copy_s"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".mcap")
    row = {
        "wall_s": timing["wall_s"],
        "x_realtime": timing["throughput_x_realtime"],
        "startup_s": round(total - timing["wall_s"], 3),
        "cycles": n,
        "output_mib": round(size / 2**20, 1),
        "cycle_p50_ms": lat["total"]["p50"],
        "split_s": split,
        "bag_s": m["bag_duration_s"],
        "backend": m["backend"],
    }
    shutil.rmtree(out)
    return row


#: Replay variants timed per drive: the default output bag (outputs only, the input referenced), the
#: same read and decoded in line (no reader thread), and the output bag with the sensors copied in.
REPLAY_VARIANTS: tuple[tuple[str, bool, int], ...] = (
    ("no_sensors", False, ReplayOptions.prefetch),
    ("no_sensors_inline", False, 0),
    ("copy_sensors", True, ReplayOptions.prefetch),
)


def bench_replay(seconds: float, model: str | Path | None, backend: str, threads: int | None,
                 rig: Any = None, jpeg_rig: Any = None) -> dict[str, Any]:
    """``lmm-fusion replay`` of two synthetic drives: ``rig`` (default: the default rig, 64x2048 LiDAR and
    a 1280x720 raw Image camera) and ``jpeg_rig`` (default: the same with a 640x360 JPEG camera).

    Each drive (``seconds`` long, seed 7) is cached under :func:`lmm_fusion.base.paths.cache_dir` and
    reused; outputs go to a temporary folder that is removed. Per drive and variant
    (:data:`REPLAY_VARIANTS`): ``wall_s`` (replay's own timing: opening the bag, reading, cycles,
    writing), ``x_realtime`` (bag seconds per wall second), ``startup_s`` (model load and warm-up, not in
    ``wall_s``), output size, and ``split_s``: seconds per stage over the whole replay, with
    ``read_decode_copy`` the rest of the wall time (reading, decoding and copying that the cycles did
    not hide). ``ratios`` compares the variants of one drive, measured in the same run; ``meets_target``
    says whether the default variant reaches :data:`REPLAY_TARGET_X`. ``anchors``: the per-message work
    beside what a user would write instead (:func:`bench_anchors`).
    """
    rig = rig or SensorRig()
    jpeg_rig = jpeg_rig or SensorRig(camera=CameraModel(640, 360))
    out: dict[str, Any] = {"target_x_realtime": REPLAY_TARGET_X, "drives": {}}
    with tempfile.TemporaryDirectory(prefix="lmm_fusion_bench_replay_") as tmp:
        for r, compressed in ((rig, False), (jpeg_rig, True)):
            name = f"{'jpeg' if compressed else 'raw'}_{r.camera.width}x{r.camera.height}"
            drive, synth_s = _replay_drive(seconds, r, compressed)
            size = sum(f.stat().st_size for f in drive.iterdir())
            row: dict[str, Any] = {"drive": str(drive), "bag_mib": round(size / 2**20, 1), "synth_s": synth_s}
            for variant, copy, prefetch in REPLAY_VARIANTS:
                opts = ReplayOptions(model_dir=model, backend=backend, threads=threads, progress=False,
                                     copy_sensors=copy, prefetch=prefetch, rig=r)
                row[variant] = _replay_variant(drive, Path(tmp) / f"{name}_{variant}", opts)
            base = row["no_sensors"]["wall_s"]
            row["ratios"] = {f"{v}_wall_over_no_sensors": round(row[v]["wall_s"] / base, 3)
                             for v, _, _ in REPLAY_VARIANTS[1:] if base}
            row["meets_target"] = (row["no_sensors"]["x_realtime"] or 0) >= REPLAY_TARGET_X
            out["drives"][name] = row
            out["bag_s"], out["backend"] = row["no_sensors"]["bag_s"], row["no_sensors"]["backend"]
    out["anchors"] = bench_anchors(50)
    return out


def bench_anchors(iterations: int, n_points: int = ANCHOR_POINTS, cfg: Any = None) -> dict[str, Any]:
    """The per-message work of a replay cycle beside its anchors, timed in the same run: ``read_points``
    against the sensor_msgs_py-style structured-view read (:func:`~lmm_fusion.io.pointcloud.structured_view_read`)
    of the same ``n_points`` cloud, in a packed xyzi layout and in Ouster's 48-byte one; and BEV gridding
    of 120k points (``cfg``: the model config, default the default one)."""
    types = rosbags_types()
    header = make_header(types, 1.0, "lidar")
    pts = synthetic_points(n_points)
    out: dict[str, Any] = {"points": n_points}
    for name, cloud in (("pointcloud_xyzi", create_cloud(types, header, pts, ("x", "y", "z", "intensity"))),
                        ("pointcloud_ouster_48B", create_cloud(types, header, padded_cloud_array(pts)))):
        ours = timeit(functools.partial(read_points, cloud), iterations)
        anchor = timeit(functools.partial(structured_view_read, cloud), iterations)
        out[name] = {"read_points": ours, "structured_view_read": anchor,
                     "ratio_read_points_over_anchor": round(ours["p50_ms"] / anchor["p50_ms"], 3)}
    pre = Preprocessor(cfg or ModelConfig(), SensorRig())
    bev_pts = synthetic_points(120_000)
    out["bev_gridding_120k"] = timeit(lambda: pre.bev(bev_pts), iterations)
    return out


def machine_info() -> dict[str, Any]:
    """CPU, cores, Python/torch/ONNX Runtime versions, CUDA device, torch threads."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The report of ``lmm-fusion bench`` for the parsed options."""
    width, height = (int(v) for v in args.image.lower().split("x"))
    stages = set(args.stage or [s for s in STAGES if s != "synth"])
    torch.set_num_threads(args.threads)
    points = synthetic_points(args.points)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "points": args.points,
            "image": f"{width}x{height}",
            "iterations": args.iterations,
            "device": args.device,
            "threads": args.threads,
        },
    }
    pipeline = FusionPipeline(
        args.model, backend=args.backend, threads=args.threads, device=None if args.device == "cpu" else args.device
    )
    report["config"]["model"] = pipeline.describe()
    n = args.iterations
    if "io" in stages:
        report["io"] = bench_io(points, width, height, n)
    if "preprocess" in stages:
        report["preprocess"] = bench_preprocess(points, width, height, n, pipeline.model_cfg)
    if "model" in stages:
        report["model"] = bench_model(pipeline.model_dir, args.device, n, args.threads)
    rgb = synthetic_image(width, height)
    if "outputs" in stages:
        report["outputs"] = bench_outputs(pipeline, points, rgb, n)
    if "cycle" in stages:
        report["cycle"] = bench_cycle(pipeline, points, width, height, n)
    if "scaling" in stages:
        report["scaling"] = bench_scaling(pipeline, max(5, n // 4))
        if args.plot:
            plot_scaling(report["scaling"], Path(args.plot))
            report["scaling"]["plot"] = str(args.plot)
    if "synth" in stages:
        report["synth"] = bench_synth(args.synth_seconds)
    if "replay" in stages:
        report["replay"] = bench_replay(args.replay_seconds, args.model, args.backend, args.replay_threads)
    report["rss_mib"] = rss_mib()
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON report (default: a short table)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--points", type=int, default=120_000, help="LiDAR points per scan")
    p.add_argument("--image", default="1280x720", help="camera image WxH")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--replay-threads", type=int, default=None,
                   help="backend threads of the replay stage (default: replay's own, 1 beside its reading thread)")
    p.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--backend",
        default="onnxruntime" if os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "auto",
        help="backend of the pipeline used for outputs/cycle/scaling",
    )
    p.add_argument("--plot", default=None, help="write the scaling plot PNG here")
    p.add_argument("--synth-seconds", type=float, default=6.0, help="seconds of drive timed for the synth stage")
    p.add_argument("--replay-seconds", type=float, default=20.0,
                   help="seconds of each synthetic drive replayed by the replay stage (cached)")


def _table(report: dict[str, Any]) -> str:
    lines = []
    for section in ("io", "preprocess", "model", "outputs", "cycle"):
        for k, v in report.get(section, {}).items():
            if isinstance(v, dict) and "p50_ms" in v:
                lines.append(f"{section:>10} {k:<36} p50 {v['p50_ms']:9.3f} ms  p99 {v['p99_ms']:9.3f} ms")
    rep = report.get("replay", {})
    for drive, row in rep.get("drives", {}).items():
        for k, _, _ in REPLAY_VARIANTS:
            lines.append(f"{'replay':>10} {drive + ' ' + k:<36} {row[k]['wall_s']:9.3f} s  = {row[k]['x_realtime']} x"
                         f" real time ({row[k]['bag_s']} s of bag)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.backend == "auto" and args.device == "cpu":
        args.backend = "onnxruntime"
    report = run_bench(args)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else _table(report))
    return 0
