"""LiDAR intensity in any unit: a drive whose clouds carry 0..255 or 16-bit intensities replays like the original."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmm_fusion.base import topics as T
from lmm_fusion.base.paths import default_model_dir
from lmm_fusion.base.rig import CameraModel, LidarModel, SensorRig
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.io import read_points, rosbags_types
from lmm_fusion.io.bags import BagWriter, read_bag
from lmm_fusion.io.pointcloud import COUNT_TARGET, create_cloud, detect_intensity_scale
from lmm_fusion.model.config import ModelConfig
from lmm_fusion.offline.replay import OUTPUT_TOPICS, ReplayOptions, replay

RIG = SensorRig(camera=CameraModel(320, 180), lidar=LidarModel(beams=16, columns=256))
DRIVE = dict(seconds=2.5, seed=5, rig=RIG)


def _opts(model_dir: Path, rig: SensorRig = RIG) -> ReplayOptions:
    return ReplayOptions(model_dir=model_dir, backend="torch", progress=False, rig=rig, threads=1)


def _rewrite(src: Path, dst: Path, convert: Callable[[np.ndarray], tuple[np.ndarray, Any]]) -> Path:
    """Copy a bag with every cloud's intensity column rewritten as ``convert(intensity) -> (values, dtype)``."""
    types = rosbags_types()
    with BagWriter(dst) as w:
        for m in read_bag(src):
            msg = m.msg
            if m.topic == T.LIDAR_POINTS:
                pts = read_points(msg, ("x", "y", "z", "intensity"))
                values, dtype = convert(pts[:, 3])
                rec = np.empty(len(pts), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", dtype)])
                rec["x"], rec["y"], rec["z"], rec["intensity"] = pts[:, 0], pts[:, 1], pts[:, 2], values
                msg = create_cloud(types, msg.header, rec)
            w.write(m.topic, m.stamp_sec, msg)
    return dst


def _actions(out: Path) -> list[int]:
    return [int(m.msg.action) for m in read_bag(out / "outputs.mcap") if m.topic == OUTPUT_TOPICS["action"]]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The shipped, trained model: it relies on the intensity channel (a random model's actions barely do)."""
    return default_model_dir()


@pytest.fixture(scope="module")
def original(drive: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    out = tmp_path_factory.mktemp("orig")
    replay(drive, out, _opts(model_dir))
    return _actions(out)


def _agreement(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b) and len(a) >= 20
    return float(np.mean(np.asarray(a) == np.asarray(b)))


@pytest.mark.parametrize(
    "name, convert",
    [
        ("float32 x255", lambda i: (i * 255.0, "<f4")),
        ("uint8", lambda i: (np.round(i * 255.0).astype(np.uint8), "u1")),
        ("uint16", lambda i: (np.round(i * 65535.0).astype(np.uint16), "<u2")),
    ],
)
def test_scaled_intensities_replay_like_the_original(
    name: str, convert: Callable[[np.ndarray], tuple[np.ndarray, Any]], drive: Path, model_dir: Path,
    original: list[int], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    bag = _rewrite(drive, tmp_path / "bag", convert)
    with caplog.at_level(logging.INFO, logger="lmm_fusion.cycle.preprocess"):
        replay(bag, tmp_path / "out", _opts(model_dir))
    chosen = [r.getMessage() for r in caplog.records if "LiDAR intensity: dividing by" in r.getMessage()]
    assert len(chosen) == 1, chosen  # logged once, when chosen
    assert _agreement(_actions(tmp_path / "out"), original) >= 0.98


def test_unnormalised_intensities_change_the_actions(
    drive: Path, model_dir: Path, original: list[int], tmp_path: Path
) -> None:
    """The same x255 bag with the scale forced to 1 (the old behaviour) does not replay like the original,
    so the test above can fail."""
    bag = _rewrite(drive, tmp_path / "bag", lambda i: (i * 255.0, "<f4"))
    rig = SensorRig(camera=RIG.camera, lidar=LidarModel(beams=16, columns=256, intensity_scale=1.0))
    replay(bag, tmp_path / "out", _opts(model_dir, rig))
    assert _agreement(_actions(tmp_path / "out"), original) < 0.98


def test_detect_intensity_scale_rules() -> None:
    rng = np.random.default_rng(0)
    unit = rng.uniform(0, 1, 1000).astype(np.float32)
    assert detect_intensity_scale(unit).scale == 1.0  # type: ignore[union-attr]
    assert detect_intensity_scale(unit * 255).scale == 255.0  # type: ignore[union-attr]
    # A uint8 field is 0..255 even when a cloud's returns are all dim.
    assert detect_intensity_scale(np.ones(10), np.dtype("u1")).scale == 255.0  # type: ignore[union-attr]
    assert detect_intensity_scale(unit * 65535).scale == 65535.0  # type: ignore[union-attr]
    assert detect_intensity_scale(unit * 3000).scale == 65535.0  # type: ignore[union-attr]
    counts = rng.gamma(2.0, 40000.0, 5000)  # photon counts beyond 16 bits
    found = detect_intensity_scale(counts)
    # its 99th percentile lands where the training data's is
    assert found is not None and found.scale == pytest.approx(np.percentile(counts, 99.0) / COUNT_TARGET)
    assert np.mean(counts / found.scale <= COUNT_TARGET) == pytest.approx(0.99, abs=0.002)
    assert detect_intensity_scale(np.zeros(5)) is None
    # a few corrupt returns do not choose the scale
    assert detect_intensity_scale(np.append(unit, [1e30])).scale == 1.0  # type: ignore[union-attr]


def test_preprocessor_scale_override_and_redetection() -> None:
    cfg = ModelConfig()
    pts = np.array([[10.0, 0.0, 0.0, 200.0]], np.float32)
    fixed = Preprocessor(cfg, SensorRig(lidar=LidarModel(intensity_scale=100.0)))
    assert fixed.bev(pts)[3].max() == pytest.approx(2.0 / cfg.bev_intensity_scale)
    auto = Preprocessor(cfg)
    assert auto.bev(pts)[3].max() == pytest.approx((200.0 / 255.0) / cfg.bev_intensity_scale)
    assert auto.intensity_scale == 255.0
    # A first cloud of dim returns only (all <= 1) chose 1; a later 0..255 cloud chooses again.
    late = Preprocessor(cfg)
    late.bev(np.array([[10.0, 0.0, 0.0, 0.5]], np.float32))
    assert late.intensity_scale == 1.0
    outlier = np.array([[10.0, 0.0, 0.0, 0.5]] * 200 + [[10.0, 0.0, 0.0, 1e30]], np.float32)
    late.bev(outlier)  # one corrupt return among 201: kept
    assert late.intensity_scale == 1.0
    late.bev(pts)
    assert late.intensity_scale == 255.0
    with pytest.raises(ValueError, match="intensity_scale"):
        Preprocessor(cfg, SensorRig(lidar=LidarModel(intensity_scale=0.0)))
