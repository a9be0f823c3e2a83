"""Preprocessor: BEV scatter geometry, image and ego features, snapshot -> inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from lmm_fusion.io.errors import MessageError
from lmm_fusion.model import ModelConfig
from lmm_fusion.preprocess import Preprocessor
from lmm_fusion.rig import Mount, SensorRig


@dataclass
class _Ego:
    speed: float = 10.0
    accel: float = -1.5
    yaw_rate: float = 0.1
    status: int = 0
    horizontal_std: float = 0.05
    valid: bool = True


@dataclass
class _Snap:
    frames: dict[str, Any]
    mask: np.ndarray = field(default_factory=lambda: np.ones(3, bool))


def _base_to_lidar(rig: SensorRig, xyz_base: np.ndarray) -> np.ndarray:
    t = np.linalg.inv(rig.lidar_mount.matrix())
    return (xyz_base @ t[:3, :3].T + t[:3, 3]).astype(np.float32)


@pytest.mark.parametrize("mount", [Mount(x=1.2, z=1.85), Mount(x=0.5, y=0.3, z=2.0, yaw=math.radians(30))])
def test_point_lands_in_its_cell_with_its_height(mount: Mount) -> None:
    cfg = ModelConfig()
    rig = SensorRig(lidar_mount=mount)
    pre = Preprocessor(cfg, rig)
    g = cfg.input_bev_grid
    base = np.array([[20.2, -3.7, 1.5], [20.3, -3.9, 0.5], [-7.9, 15.9, 0.2]])
    lidar = _base_to_lidar(rig, base)
    pts = np.c_[lidar, [0.8, 0.4, 0.1]].astype(np.float32)
    bev = pre.bev(pts)
    assert bev.shape == (4, g.ny, g.nx) == (4, 64, 128)
    iy, ix = int((-3.7 + 16) / 0.5), int((20.2 + 8) / 0.5)
    h = cfg.bev_height_scale
    assert bev[0, iy, ix] == pytest.approx(1.5 / h, abs=1e-5)
    assert bev[1, iy, ix] == pytest.approx(1.0 / h, abs=1e-5)
    assert bev[2, iy, ix] == pytest.approx(math.log1p(2) / cfg.bev_density_scale, rel=1e-5)
    assert bev[3, iy, ix] == pytest.approx(0.6 / cfg.bev_intensity_scale, abs=1e-5)
    assert bev[0, 63, 0] == pytest.approx(0.2 / h, abs=1e-5)  # corner cell (row = +y, col = +x)
    occupied = bev[2] > 0
    assert occupied.sum() == 2


def test_points_outside_grid_or_band_or_nan_are_dropped() -> None:
    cfg = ModelConfig()
    rig = SensorRig()
    pre = Preprocessor(cfg, rig)
    base = np.array([[60.0, 0.0, 1.0], [10.0, 17.0, 1.0], [10.0, 0.0, cfg.bev_z_max + 0.5],
                     [10.0, 0.0, cfg.bev_z_min - 0.5]])
    pts = np.c_[_base_to_lidar(rig, base), np.ones(4)].astype(np.float32)
    pts = np.vstack([pts, [[np.nan, 0, 0, 1]]]).astype(np.float32)
    assert not pre.bev(pts).any()
    assert not pre.bev(np.zeros((0, 4), np.float32)).any()


def test_negative_heights_survive_max() -> None:
    cfg = ModelConfig()
    rig = SensorRig()
    pre = Preprocessor(cfg, rig)
    base = np.array([[5.1, 0.1, -0.3], [5.2, 0.2, -0.6]])
    bev = pre.bev(_base_to_lidar(rig, base))  # xyz only: intensity channel stays 0
    iy, ix = int(16 / 0.5), int(13 / 0.5)
    assert bev[0, iy, ix] == pytest.approx(-0.3 / cfg.bev_height_scale, abs=1e-5)
    assert bev[3].max() == 0.0


def test_bad_points_and_images_raise_message_error() -> None:
    pre = Preprocessor(ModelConfig())
    with pytest.raises(MessageError, match="points"):
        pre.bev(np.zeros((5, 2), np.float32))
    with pytest.raises(MessageError, match="image"):
        pre.image(np.zeros((10, 10), np.uint8))
    with pytest.raises(MessageError, match="uint8"):
        pre.image(np.zeros((10, 10, 3), np.float32))


def test_image_is_resized_and_normalised() -> None:
    cfg = ModelConfig()
    pre = Preprocessor(cfg)
    img = np.full((720, 1280, 3), 255, np.uint8)
    img[..., 1] = 0
    out = pre.image(img)
    assert out.shape == (3, cfg.image_height, cfg.image_width) and out.dtype == np.float32
    assert out[0].mean() == pytest.approx((1.0 - cfg.image_mean[0]) / cfg.image_std[0], rel=1e-5)
    assert out[1].mean() == pytest.approx((0.0 - cfg.image_mean[1]) / cfg.image_std[1], rel=1e-5)


def test_ego_features() -> None:
    cfg = ModelConfig()
    pre = Preprocessor(cfg)
    f = pre.ego(_Ego())
    assert f.shape == (cfg.ego_features,)
    assert f[0] == pytest.approx(10.0 / cfg.speed_scale)
    assert f[1] == pytest.approx(-1.5 / cfg.accel_scale)
    assert f[7] == 1.0
    assert not pre.ego(None).any()
    assert not pre.ego(_Ego(valid=False)).any()
    assert np.isfinite(pre.ego(_Ego(speed=float("nan")))).all()


def test_inputs_mask_follows_snapshot_and_validity() -> None:
    cfg = ModelConfig()
    pre = Preprocessor(cfg)
    img = np.zeros((72, 128, 3), np.uint8)
    pts = np.array([[10.0, 0.0, -1.0, 0.5]], np.float32)
    out = pre.inputs(_Snap({"camera": img, "lidar": pts, "gnss": _Ego(valid=False)}))
    assert out["modality_mask"].tolist() == [[1.0, 1.0, 0.0]]
    assert out["image"].shape == (1, 3, cfg.image_height, cfg.image_width)
    assert out["bev"].shape == (1, 4, 64, 128) and out["ego"].shape == (1, cfg.ego_features)
    out = pre.inputs(_Snap({"camera": img, "lidar": pts, "gnss": _Ego()}, np.array([False, True, True])))
    assert out["modality_mask"].tolist() == [[0.0, 1.0, 1.0]]
    assert not out["image"].any() and out["bev"].any() and out["ego"].any()
    assert all(v.dtype == np.float32 for v in out.values())


def test_bev_with_precomputed_base_points_is_identical() -> None:
    from lmm_fusion.bench import synthetic_points

    pre = Preprocessor(ModelConfig())
    pts = synthetic_points(5000, seed=3)
    np.testing.assert_array_equal(pre.bev(pts, pre.points_to_base(pts)), pre.bev(pts))
    with pytest.raises(ValueError, match="xyz_base"):
        pre.bev(pts, pre.points_to_base(pts[:10]))
