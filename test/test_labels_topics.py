"""The shared vocabulary stays consistent with the grids and the rig."""

import numpy as np

from lmm_fusion.base.grid import INPUT_GRID, OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.rig import OPTICAL_TO_BODY, Mount, SensorRig


def test_grid_shapes_and_indices() -> None:
    assert INPUT_GRID.shape == (64, 128)
    assert OCCUPANCY_GRID.shape == (32, 64)
    g = BevGrid(x_min=0, x_max=4, y_min=-2, y_max=2, cell=1.0)
    iy, ix, inside = g.indices(np.array([0.5, 3.9, 4.0, -0.1]), np.array([-1.5, 1.9, 0.0, 0.0]))
    assert inside.tolist() == [True, True, False, False]
    assert (iy[:2].tolist(), ix[:2].tolist()) == ([0, 3], [0, 3])
    xc, yc = g.centers()
    assert xc[0, 0] == 0.5 and yc[0, 0] == -1.5 and xc[3, 3] == 3.5


def test_mount_rotation_is_proper_and_yaw_turns_left() -> None:
    r = Mount(yaw=np.pi / 2).rotation()
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(Mount(pitch=0.1, roll=0.2, yaw=0.3).rotation() @ Mount(
        pitch=0.1, roll=0.2, yaw=0.3).rotation().T, np.eye(3), atol=1e-12)
    # Optical z (forward) is body x; optical x (right) is body -y.
    np.testing.assert_allclose(OPTICAL_TO_BODY @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(OPTICAL_TO_BODY @ [1, 0, 0], [0, -1, 0])
    assert np.isclose(np.linalg.det(OPTICAL_TO_BODY), 1.0)


def test_camera_intrinsics_follow_fov() -> None:
    rig = SensorRig()
    assert np.isclose(rig.camera.fx, 640.0)  # 90 deg horizontal FOV at 1280 px
    t = rig.camera_optical_to_base()
    assert t.shape == (4, 4) and np.isclose(t[2, 3], rig.camera_mount.z)


def test_transform_points_matches_homogeneous_product() -> None:
    from lmm_fusion.base.rig import transform_points

    rng = np.random.default_rng(0)
    t = Mount(x=1.2, y=-0.3, z=1.8, roll=0.05, pitch=-0.1, yaw=0.4).matrix()
    pts = rng.uniform(-50, 50, (1000, 4)).astype(np.float32)
    homog = np.c_[pts[:, :3].astype(np.float64), np.ones(len(pts))]
    expected = (homog @ t.T)[:, :3]
    got = transform_points(t, pts)
    assert got.dtype == np.float32 and got.shape == (1000, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
