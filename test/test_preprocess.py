"""Preprocessor: BEV scatter geometry, image and ego features, snapshot -> inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest

from lmm_fusion.base.rig import Mount, SensorRig
from lmm_fusion.cycle.preprocess import BevHistory, Preprocessor
from lmm_fusion.io.errors import MessageError
from lmm_fusion.model import ModelConfig
from lmm_fusion.tools.payloads import synthetic_points


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
    now: float = 100.0
    stamps: dict[str, float | None] = field(default_factory=dict)


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
    assert out["bev"].shape == (1, cfg.bev_input_channels, 64, 128) and out["ego"].shape == (1, cfg.ego_features)
    out = pre.inputs(_Snap({"camera": img, "lidar": pts, "gnss": _Ego()}, np.array([False, True, True])))
    assert out["modality_mask"].tolist() == [[0.0, 1.0, 1.0]]
    assert not out["image"].any() and out["bev"].any() and out["ego"].any()
    assert all(v.dtype == np.float32 for v in out.values())


def test_bev_with_precomputed_base_points_is_identical() -> None:
    pre = Preprocessor(ModelConfig())
    pts = synthetic_points(5000, seed=3)
    np.testing.assert_array_equal(pre.bev(pts, pre.points_to_base(pts)), pre.bev(pts))
    with pytest.raises(ValueError, match="xyz_base"):
        pre.bev(pts, pre.points_to_base(pts[:10]))


def _frame(value: float) -> np.ndarray:
    return np.full((4, 2, 3), value, np.float32)


def test_history_repeats_the_current_frame_until_one_lag_old_exists() -> None:
    h = BevHistory(frames=1, lag=0.5)
    for i in range(5):  # 0.0 .. 0.4 s: no frame 0.5 s old yet -> "no motion seen"
        out = h.stack(10.0 + 0.1 * i, _frame(i))
        assert out.shape == (8, 2, 3)
        np.testing.assert_array_equal(out[4:], out[:4])
    out = h.stack(10.5, _frame(5))  # now the frame of 10.0 s is exactly one lag old
    assert out[:4].max() == 5 and out[4:].max() == 0
    out = h.stack(10.6, _frame(6))
    assert out[4:].max() == 1


def test_history_with_two_frames_and_lidar_gaps() -> None:
    h = BevHistory(frames=2, lag=0.5)
    for i in range(11):
        out = h.stack(0.1 * i, _frame(i))
    assert [out[4 * k].max() for k in range(3)] == [10, 5, 0]
    # a LiDAR gap: nothing within tolerance of t - 0.5 s -> that slot repeats the current frame, while
    # the frame of t - 1.0 s still fills its own slot
    out = h.stack(2.0, _frame(20))
    assert [out[4 * k].max() for k in range(3)] == [20, 20, 10]
    out = h.stack(3.0, _frame(30))
    assert [out[4 * k].max() for k in range(3)] == [30, 30, 20]


def test_history_ignores_a_repeated_stamp_and_resets_on_a_jump_back() -> None:
    h = BevHistory(frames=1, lag=0.5)
    h.stack(1.0, _frame(1))
    h.stack(1.5, _frame(2))
    out = h.stack(1.5, _frame(99))  # the node cycled twice on one LiDAR frame: the stored one stays
    assert out[:4].max() == 99 and out[4:].max() == 1
    assert h.stack(1.5, _frame(3))[4:].max() == 1
    out = h.stack(0.5, _frame(7))  # bag restarted: older stamp -> history cleared
    np.testing.assert_array_equal(out[4:], out[:4])
    assert h.stack(1.0, _frame(8))[4:].max() == 7
    with pytest.raises(ValueError, match="stamp"):
        h.stack(math.nan, _frame(0))


def test_history_off_is_the_frame_itself_and_config_bounds() -> None:
    bev = _frame(3)
    assert BevHistory(frames=0, lag=0.5).stack(1.0, bev) is bev
    assert ModelConfig(bev_history_frames=0).bev_input_channels == 4
    assert ModelConfig(bev_history_frames=2).bev_input_channels == 12
    for bad in ({"bev_history_frames": -1}, {"bev_history_frames": 9}, {"bev_history_lag": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(**bad).validate()


def test_inputs_stack_the_lidar_history_by_lidar_stamp() -> None:
    cfg = ModelConfig(bev_history_frames=1, bev_history_lag=0.5)
    pre = Preprocessor(cfg)
    g = cfg.input_bev_grid
    # one point moving 2 m closer per 0.5 s (a closing obstacle), 10 Hz LiDAR
    outs = []
    for i in range(6):
        pts = np.array([[30.0 - 0.4 * i, 0.0, -1.0, 0.5]], np.float32)
        outs.append(pre.inputs(_Snap({"camera": None, "lidar": pts, "gnss": None}, np.array([False, True, False]),
                                     now=5.0 + 0.1 * i + 0.02, stamps={"lidar": 5.0 + 0.1 * i}))["bev"][0])
    last = outs[-1]
    cur = np.argwhere(last[2] > 0)
    old = np.argwhere(last[6] > 0)
    assert len(cur) == len(old) == 1
    assert (old[0][1] - cur[0][1]) * g.cell == pytest.approx(2.0, abs=g.cell)
    pre.reset()
    again = pre.inputs(_Snap({"camera": None, "lidar": pts, "gnss": None}, np.array([False, True, False]),
                             now=5.6, stamps={"lidar": 5.6}))["bev"][0]
    np.testing.assert_array_equal(again[4:], again[:4])


def test_roi_band_keeps_a_distant_lamp_that_the_whole_view_shrinks_away() -> None:
    cfg = ModelConfig(image_height=176, image_width=224, image_roi_rows=64, image_roi=(0.3, 0.24, 0.7, 0.5))
    pre = Preprocessor(cfg)
    img = np.full((360, 640, 3), 90, np.uint8)
    img[110:112, 330:332] = (255, 0, 0)  # a 2x2 px red lamp inside the window (rows 86..180, cols 192..448)
    out = pre.resize_image(img)
    assert out.shape == (176, 224, 3)
    band, view = out[:64].astype(int), out[64:].astype(int)
    red_band = (band[..., 0] - band[..., 1]).max()
    red_view = (view[..., 0] - view[..., 1]).max()
    assert red_band > 100  # near-native resolution: the lamp's colour survives
    assert red_view < red_band / 2  # area-averaged with its surroundings in the whole view
    # the band is the window, the rest the whole image: a mark outside the window shows only below
    img2 = np.full((360, 640, 3), 90, np.uint8)
    img2[300:360, 0:60] = 255
    out2 = pre.resize_image(img2).astype(int)
    assert out2[:64].max() == 90 and out2[64:].max() > 200
    # the same field of view at another resolution gives the same band
    big = cv2.resize(img, (1280, 720), interpolation=cv2.INTER_NEAREST)
    assert np.abs(pre.resize_image(big)[:64].astype(int) - out[:64]).mean() < 3


def test_roi_config_is_checked() -> None:
    with pytest.raises(ValueError, match="image_roi_rows"):
        ModelConfig(image_height=64, image_roi_rows=60).validate()
    with pytest.raises(ValueError, match="image_roi"):
        ModelConfig(image_roi=(0.5, 0.2, 0.4, 0.6)).validate()
    with pytest.raises(ValueError, match="image_roi"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "image_roi": [0.3, 0.24, 0.7]})


@pytest.mark.parametrize("src", [(360, 640), (720, 1280), (480, 640)])
def test_decimate_area_resize_matches_one_area_resize(src: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    # smooth content plus sharp edges: what a camera sees
    img = cv2.GaussianBlur((rng.random((*src, 3)) * 255).astype(np.uint8), (0, 0), 3)
    img[src[0] // 3: src[0] // 2, src[1] // 4: src[1] // 2] = (250, 30, 30)
    fast = Preprocessor(ModelConfig(image_resize="decimate_area")).resize_image(img).astype(int)
    exact = Preprocessor(ModelConfig(image_resize="area")).resize_image(img).astype(int)
    assert fast.shape == exact.shape == (176, 224, 3)
    np.testing.assert_array_equal(fast[:64], exact[:64])  # the close-up band is resized the same way
    diff = np.abs(fast[64:] - exact[64:])
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 40
    with pytest.raises(ValueError, match="image_resize"):
        ModelConfig(image_resize="bilinear").validate()


def _bev_reference(pre: Preprocessor, pts: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """The BEV gridding written plainly: every point gridded with ``BevGrid.indices``, then masked, then
    scattered; the optimised :meth:`Preprocessor.bev` must give these exact bits."""
    cfg, g = pre.cfg, pre.grid
    out = np.zeros((4, g.ny, g.nx), np.float32)
    finite = np.isfinite(xyz).all(axis=1)
    pts, xyz = pts[finite], xyz[finite]
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow: outside either way
        iy, ix, inside = g.indices(x, y)
    keep = inside & (z >= cfg.bev_z_min) & (z <= cfg.bev_z_max)
    if not keep.any():
        return out
    flat = (iy * g.nx + ix)[keep]
    zk = z[keep]
    n = g.ny * g.nx
    count = np.bincount(flat, minlength=n).astype(np.float32)
    occupied = count > 0
    inv_count = np.zeros(n, np.float32)
    inv_count[occupied] = 1.0 / count[occupied]
    zmax = np.zeros(n, np.float32)
    np.maximum.at(zmax, flat, zk - cfg.bev_z_min + 1.0)
    zmax[occupied] += cfg.bev_z_min - 1.0
    zsum = np.bincount(flat, weights=zk, minlength=n).astype(np.float32)
    inv_h = 1.0 / cfg.bev_height_scale
    out[0] = (zmax * inv_h).reshape(g.ny, g.nx)
    out[1] = (zsum * inv_count * inv_h).reshape(g.ny, g.nx)
    out[2] = (np.log1p(count) * (1.0 / cfg.bev_density_scale)).reshape(g.ny, g.nx)
    if pts.shape[1] >= 4:
        inten = np.asarray(pts[:, 3], np.float32)[keep]
        inten = np.where(np.isfinite(inten), inten, 0.0)
        isum = np.bincount(flat, weights=inten, minlength=n).astype(np.float32)
        scale = pre.update_intensity_scale(pts[:, 3])
        out[3] = (isum * inv_count * (1.0 / (cfg.bev_intensity_scale * scale))).reshape(g.ny, g.nx)
    return out


def _random_cloud(rng: np.random.Generator, n: int, columns: int) -> np.ndarray:
    g = ModelConfig().input_bev_grid
    pts = np.empty((n, columns), np.float32)
    pts[:, 0] = rng.uniform(g.x_min - 20, g.x_max + 20, n)
    pts[:, 1] = rng.uniform(g.y_min - 10, g.y_max + 10, n)
    pts[:, 2] = rng.uniform(-4.0, 7.0, n)
    if columns > 3:
        pts[:, 3] = rng.uniform(0.0, 1.0, n)
    # Cell edges and grid borders exactly, -0.0, non-finite and huge values, NaN intensities.
    k = n // 20
    pts[:k, 0] = g.x_min + g.cell * rng.integers(-3, 135, k)
    pts[k:2 * k, 1] = g.y_min + g.cell * rng.integers(-3, 70, k)
    pts[2 * k:2 * k + 5, 0] = [np.nan, np.inf, -np.inf, 3e38, -0.0]
    pts[2 * k + 5:2 * k + 8, 2] = [np.nan, 1e30, -np.inf]
    if columns > 3:
        pts[2 * k + 8:3 * k, 3] = np.nan
    return pts


@pytest.mark.parametrize("seed", range(6))
def test_bev_gridding_is_bit_identical_to_the_plain_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rig = SensorRig()
    n = int(rng.integers(1, 40_000))
    pts = _random_cloud(rng, n, 3 if seed % 3 == 2 else 4)
    # LiDAR-frame points as the node gets them; base_link float32 (the pipeline) or float64 (a caller's own).
    xyz = Preprocessor(ModelConfig(), rig).points_to_base(pts)
    if seed == 1:
        xyz = xyz.astype(np.float64)
    fast, plain = Preprocessor(ModelConfig(), rig), Preprocessor(ModelConfig(), rig)
    with np.errstate(over="ignore", invalid="ignore"):
        got = fast.bev(pts, xyz)
        want = _bev_reference(plain, pts, xyz)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got[2].any()  # the cloud reached the grid: the comparison is not between two empty grids


def test_image_prepared_ahead_is_the_same_and_taken_once_per_frame() -> None:
    pre = Preprocessor(ModelConfig())
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(3)]
    want = [Preprocessor(ModelConfig()).image(f) for f in frames]
    for f in frames:
        pre.prepare_image(f)
    pre.prepare_image(None)  # no frame: nothing to do
    pre.prepare_image(np.zeros((4, 4), np.uint8))  # refused: left to the cycle, which raises as before
    got = pre.image(frames[1])
    np.testing.assert_array_equal(got, want[1])
    assert pre.image(frames[1]) is got  # the same frame in the next cycle (camera slower than the cycle)
    assert pre.image(frames[0]) is not got and frames[0] is not None  # dropped as older: computed again
    np.testing.assert_array_equal(pre.image(frames[0]), want[0])
    np.testing.assert_array_equal(pre.image(frames[2].copy()), want[2])  # an equal copy is not the frame
    with pytest.raises(MessageError):
        pre.image(np.zeros((4, 4), np.uint8))
