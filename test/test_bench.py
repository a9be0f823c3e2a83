"""The benchmark command produces a complete JSON report (structure only: speed is not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.cli import main
from lmm_fusion.tools.bench import REPLAY_SPLIT, bench_replay, timeit
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


def test_replay_stage_reports_both_variants(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the cached drive and random model
    rig = SensorRig(camera=CameraModel(160, 90), lidar=LidarModel(beams=8, columns=128))
    threads = torch.get_num_threads()
    try:
        rep = bench_replay(1.0, None, "torch", 1, rig=rig)
    finally:
        torch.set_num_threads(threads)
    assert rep["synth_s"] > 0 and rep["bag_s"] > 0.5 and Path(rep["drive"]).is_relative_to(tmp_path)
    for variant in ("no_sensors", "full"):
        r = rep[variant]
        assert r["cycles"] >= 5 and r["wall_s"] > 0 and r["x_realtime"] > 0 and r["startup_s"] >= 0
        assert set(r["split_s"]) == {*REPLAY_SPLIT, "read_decode_copy"}
        assert all(v >= 0 for v in r["split_s"].values())
    assert rep["full"]["output_mib"] > rep["no_sensors"]["output_mib"]
