"""The benchmark command produces a complete JSON report (structure only: speed is not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.cli import main
from lmm_fusion.tools.bench import REPLAY_SPLIT, REPLAY_VARIANTS, bench_replay, timeit
from lmm_fusion.tools.payloads import padded_cloud_array, synthetic_points


def test_timeit_reports_ordered_percentiles() -> None:
    calls = []
    stats = timeit(lambda: calls.append(1), iterations=20, warmup=2)
    assert len(calls) == 22
    assert 0 <= stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_padded_layout_is_48_bytes_and_keeps_values() -> None:
    pts = synthetic_points(100)
    rec = padded_cloud_array(pts)
    assert rec.dtype.itemsize == 48
    np.testing.assert_array_equal(rec["x"], pts[:, 0])
    np.testing.assert_array_equal(rec["intensity"], pts[:, 3])


def test_bench_json_has_every_stage(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--json", "--iterations", "2", "--points", "5000", "--image", "320x240",
               "--stage", "io", "--stage", "preprocess", "--stage", "model", "--stage", "outputs",
               "--stage", "cycle", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["io"]["pointcloud_xyzi_matching"]["zero_copy"] is True
    for section, key in [("io", "pointcloud_padded_48B"), ("io", "compressed_jpeg_decode"),
                         ("preprocess", "bev_gridding"), ("model", "onnxruntime_cpu"),
                         ("model", "torch_eager_cpu"), ("outputs", "build_output_messages"),
                         ("cycle", "cycle_raw_image_padded_cloud")]:
        stats = report[section][key]
        assert stats["n"] == 2 and stats["p50_ms"] > 0, (section, key)
    assert report["model"]["speedup_vs_torch_eager"]["torch_eager_cpu"] == 1.0
    assert set(report["cycle"]["pipeline_stage_p50_ms"]) >= {"preprocess", "inference", "total"}


def test_replay_stage_reports_both_drives_variants_and_anchors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the cached drives and random model
    lidar = LidarModel(beams=8, columns=128)
    rig = SensorRig(camera=CameraModel(160, 90), lidar=lidar)
    jpeg_rig = SensorRig(camera=CameraModel(96, 54), lidar=lidar)
    threads = torch.get_num_threads()
    try:
        rep = bench_replay(1.0, None, "torch", 1, rig=rig, jpeg_rig=jpeg_rig)
    finally:
        torch.set_num_threads(threads)
    assert set(rep["drives"]) == {"raw_160x90", "jpeg_96x54"} and rep["target_x_realtime"] == 10.0
    for row in rep["drives"].values():
        assert row["synth_s"] > 0 and Path(row["drive"]).is_relative_to(tmp_path)
        for variant, _, _ in REPLAY_VARIANTS:
            r = row[variant]
            assert r["cycles"] >= 5 and r["wall_s"] > 0 and r["x_realtime"] > 0 and r["startup_s"] >= 0
            assert r["bag_s"] > 0.5 and set(r["split_s"]) == {*REPLAY_SPLIT, "read_decode_copy"}
            assert all(v >= 0 for v in r["split_s"].values()), (variant, r["split_s"])
        assert row["copy_sensors"]["output_mib"] > row["no_sensors"]["output_mib"]
        assert row["no_sensors"]["cycles"] == row["no_sensors_inline"]["cycles"] == row["copy_sensors"]["cycles"]
        assert set(row["ratios"]) == {"no_sensors_inline_wall_over_no_sensors", "copy_sensors_wall_over_no_sensors"}
        assert isinstance(row["meets_target"], bool)
    anchors = rep["anchors"]
    for layout in ("pointcloud_xyzi", "pointcloud_ouster_48B"):
        a = anchors[layout]
        assert a["read_points"]["p50_ms"] > 0 and a["structured_view_read"]["p50_ms"] > 0
        assert a["ratio_read_points_over_anchor"] > 0
    assert anchors["points"] == 131_072 and anchors["bev_gridding_120k"]["p50_ms"] > 0


def test_anchor_reads_agree_with_read_points() -> None:
    """The anchors time the same work: both reads give the same points for both layouts."""
    from lmm_fusion.io import create_cloud, make_header, read_points, rosbags_types
    from lmm_fusion.io.pointcloud import structured_view_read

    types = rosbags_types()
    pts = synthetic_points(1000)
    header = make_header(types, 1.0, "lidar")
    for cloud in (create_cloud(types, header, pts, ("x", "y", "z", "intensity")),
                  create_cloud(types, header, padded_cloud_array(pts))):
        np.testing.assert_array_equal(read_points(cloud), structured_view_read(cloud))
