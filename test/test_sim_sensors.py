"""Sensor models of the synthetic world: LiDAR ray casting, camera projection, GNSS fixes."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pymap3d
import pytest

from lmm_fusion.base.rig import DEFAULT_VEHICLE, CameraModel, LidarModel, Mount, SensorRig
from lmm_fusion.base.vocabulary import Light
from lmm_fusion.io.gnss import COVARIANCE_TYPE_DIAGONAL_KNOWN, STATUS_FIX, STATUS_GBAS_FIX, GnssFix
from lmm_fusion.synth.camera import CameraRenderer, camera_info_arrays
from lmm_fusion.synth.gnss import GnssSimulator
from lmm_fusion.synth.lidar import POINT_DTYPE, LidarSimulator
from lmm_fusion.synth.world import Lamp, World, static_scene


def _rig(beams: int = 16, columns: int = 256, **lidar: Any) -> SensorRig:
    return SensorRig(camera=CameraModel(width=320, height=180),
                     lidar=LidarModel(beams=beams, columns=columns, **lidar))


BOX = {"center": (15.0, 2.0, 0.9), "size": (4.0, 2.0, 1.8), "yaw": 0.4, "kind": "vehicle"}


def _box_distance(p: np.ndarray, box: dict) -> np.ndarray:
    """Distance of base_link points (N, 3) to the surface of an oriented box [m]."""
    c = np.asarray(box["center"], float)
    h = np.asarray(box["size"], float) / 2
    yaw = box.get("yaw", 0.0)
    d = p - c
    u = np.stack([math.cos(yaw) * d[:, 0] + math.sin(yaw) * d[:, 1],
                  -math.sin(yaw) * d[:, 0] + math.cos(yaw) * d[:, 1], d[:, 2]], -1)
    q = np.abs(u) - h
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + np.abs(inside)


def _to_base(rig: SensorRig, pts: np.ndarray) -> np.ndarray:
    t = rig.lidar_mount.matrix()
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], -1).astype(float)
    return np.einsum("ij,nj->ni", t[:3, :3], xyz) + t[:3, 3]


@pytest.mark.parametrize("mount", [Mount(x=1.2, z=1.85), Mount(x=1.0, y=0.3, z=1.9, roll=0.03, pitch=-0.05, yaw=0.2)])
def test_lidar_points_on_surfaces(mount: Mount) -> None:
    rig = replace(_rig(beams=32, columns=512, dropout=0.0), lidar_mount=mount)
    sim = LidarSimulator(rig)
    scene = static_scene([BOX])
    pts = sim.scan(scene, np.random.default_rng(0))
    assert pts.dtype == POINT_DTYPE and len(pts) > 1000
    p = _to_base(rig, pts)
    noise = 5 * rig.lidar.range_noise_std + 1e-4
    on_box = _box_distance(p, BOX) < noise
    on_ground = np.abs(p[:, 2]) < noise
    assert on_box.sum() > 20
    assert np.all(on_box | on_ground)  # every return lies on the box or the ground within the noise
    r = np.linalg.norm(np.stack([pts["x"], pts["y"], pts["z"]], -1), axis=1)
    assert r.min() >= rig.lidar.min_range - noise and r.max() <= rig.lidar.max_range + noise
    assert set(np.unique(pts["ring"])) <= set(range(rig.lidar.beams))
    assert np.all((pts["intensity"] >= 0) & (pts["intensity"] <= 1))


def test_lidar_level_fast_path_matches_generic() -> None:
    rig = _rig(beams=16, columns=256)
    sim = LidarSimulator(rig)
    w = World(np.random.default_rng(2))
    for t in (0.5, 7.0, 14.0):
        w.advance(t)
        scene = w.scene()
        a, b = sim._cast_level(scene), sim._cast_generic(scene)
        # Only returns within max_range are kept (the caller drops the rest); the two paths cull a box
        # just beyond it by different radii (horizontal vs 3-D), so compare what is kept.
        kept_a, kept_b = a[0] <= rig.lidar.max_range, b[0] <= rig.lidar.max_range
        np.testing.assert_array_equal(kept_a, kept_b)
        np.testing.assert_allclose(a[0][kept_a], b[0][kept_a], atol=1e-6)
        np.testing.assert_array_equal(a[1][kept_a], b[1][kept_a])
        assert kept_a.sum() > 100


def test_lidar_does_not_see_lamp_colour() -> None:
    rig = _rig(beams=32, columns=512)
    sim = LidarSimulator(rig)
    housing = {"center": (20.0, 0.0, 5.0), "size": (0.3, 0.4, 1.0), "kind": "housing", "color": (25, 25, 25)}
    clouds = []
    for state in (Light.RED, Light.GREEN):
        lamps = tuple(Lamp(np.array([19.84, 0.0, 5.0 + 0.3 * (1 - k)]), np.array([-1.0, 0, 0]), colour, state == on)
                      for k, (colour, on) in enumerate((("red", Light.RED), ("yellow", Light.YELLOW),
                                                       ("green", Light.GREEN))))
        scene = static_scene([housing], lamps=lamps, light=(18.0, state))
        clouds.append(sim.scan(scene, np.random.default_rng(3)))
    assert clouds[0].tobytes() == clouds[1].tobytes()


def test_lidar_intensity_by_material_not_colour() -> None:
    rig = _rig(beams=32, columns=512, dropout=0.0)
    sim = LidarSimulator(rig)
    clouds = [sim.scan(static_scene([dict(BOX, color=c)]), np.random.default_rng(4))
              for c in ((255, 0, 0), (0, 0, 255))]
    assert clouds[0].tobytes() == clouds[1].tobytes()


def _project(rig: SensorRig, p_base: np.ndarray) -> np.ndarray:
    """Pinhole projection written out from K and the mount (independent of the renderer)."""
    t = np.linalg.inv(rig.camera_optical_to_base())
    p = t[:3, :3] @ p_base + t[:3, 3]
    k = rig.camera.k()
    return np.array([k[0, 0] * p[0] / p[2] + k[0, 2], k[1, 1] * p[1] / p[2] + k[1, 2]])


@pytest.mark.parametrize("center", [(20.0, 0.0, 1.0), (12.0, -3.0, 0.8), (30.0, 4.0, 2.5)])
def test_camera_box_lands_where_pinhole_says(center: tuple[float, float, float]) -> None:
    rig = _rig()
    # a thin panel facing the camera with a colour nothing else in the world has
    box = {"center": center, "size": (0.05, 1.6, 1.2), "color": (255, 0, 255)}
    img = CameraRenderer(rig).render(static_scene([box]), rng=None)
    assert img.shape == (180, 320, 3) and img.dtype == np.uint8
    r, g, b = (img[..., i].astype(int) for i in range(3))
    mask = (g < 30) & (r > 100) & (np.abs(r - b) < 12)
    assert mask.sum() > 20
    ys, xs = np.nonzero(mask)
    uv = _project(rig, np.asarray(center))
    assert abs(xs.mean() + 0.5 - uv[0]) < 1.0 and abs(ys.mean() + 0.5 - uv[1]) < 1.0
    # and its extent matches the projected panel width
    half = np.array([0.0, 0.8, 0.0])
    left, right = _project(rig, np.array(center) + half), _project(rig, np.array(center) - half)
    assert abs((xs.max() - xs.min() + 1) - (right[0] - left[0])) < 2.0


def test_camera_near_plane_clipping_and_occlusion() -> None:
    rig = _rig()
    near = {"center": (8.0, 0.0, 1.0), "size": (0.5, 2.0, 2.0), "color": (0, 255, 0)}
    far = {"center": (20.0, 0.0, 1.0), "size": (0.5, 2.0, 2.0), "color": (255, 0, 255)}
    # a long wall to the right that reaches from behind the camera to 10 m ahead: must be clipped
    wall = {"center": (-5.0, -3.0, 1.0), "size": (30.0, 0.5, 2.0), "color": (255, 255, 0)}
    img = CameraRenderer(rig).render(static_scene([far, near, wall]), rng=None)
    uv = _project(rig, np.array(far["center"])).astype(int)
    px = img[uv[1], uv[0]]
    assert px[1] > 100 and px[0] < 40  # the near green panel hides the far one (painter's order)
    r, g, b = (img[..., i].astype(int) for i in range(3))
    _, xs = np.nonzero((r > 100) & (g > 100) & (b < 40) & (np.abs(r - g) < 10))
    assert len(xs) > 100
    tip = _project(rig, np.array([10.0, -2.75, 1.0]))
    assert xs.min() >= tip[0] - 2  # the wall appears right of its near-side tip only


def test_camera_info_and_lamp_colours() -> None:
    rig = _rig()
    a = camera_info_arrays(rig)
    np.testing.assert_allclose(a["k"].reshape(3, 3), rig.camera.k())
    np.testing.assert_allclose(a["p"].reshape(3, 4)[:, :3], rig.camera.k())
    assert not a["d"].any()
    housing = {"center": (12.0, 0.0, 4.0), "size": (0.3, 0.4, 1.0), "kind": "housing", "color": (25, 25, 25)}
    means = {}
    for state, colour in ((Light.RED, "red"), (Light.GREEN, "green")):
        lamps = (Lamp(np.array([11.84, 0.0, 4.3]), np.array([-1.0, 0, 0]), "red", state == Light.RED),
                 Lamp(np.array([11.84, 0.0, 3.7]), np.array([-1.0, 0, 0]), "green", state == Light.GREEN))
        img = CameraRenderer(rig).render(static_scene([housing], lamps=lamps), rng=None)
        means[colour] = img.reshape(-1, 3).astype(int)
    red_px = ((means["red"][:, 0] > 200) & (means["red"][:, 1] < 80)).sum()
    green_px = ((means["green"][:, 1] > 200) & (means["green"][:, 0] < 80)).sum()
    assert red_px > 0 and green_px > 0
    assert ((means["green"][:, 0] > 200) & (means["green"][:, 1] < 80)).sum() == 0


def test_gnss_fix_around_origin_and_degraded() -> None:
    rig = replace(_rig(), gnss=replace(SensorRig().gnss, degraded_probability=0.05))
    sim = GnssSimulator(rig, np.random.default_rng(0))
    errs, statuses = [], []
    for k in range(2000):
        f = sim.fix(k * 0.1, (100.0, -50.0, 0.0))
        e, n, _ = pymap3d.geodetic2enu(f.lat, f.lon, f.alt, rig.gnss.origin_lat, rig.gnss.origin_lon,
                                       rig.gnss.origin_alt)
        assert isinstance(f, GnssFix) and f.stamp == k * 0.1 and f.covariance_type == COVARIANCE_TYPE_DIAGONAL_KNOWN
        errs.append((e - 100.0 - rig.gnss_mount.x, n + 50.0, f.covariance[0], f.status == STATUS_FIX))  # degraded
        statuses.append(f.status)
    arr = np.array(errs)
    good = arr[:, 3] == 0
    assert 0.03 < arr[good, 0].std() < 0.07
    assert np.allclose(np.sqrt(arr[good, 2]), rig.gnss.horizontal_std)
    assert (~good).any() and arr[~good, 0].std() > 0.3 and (np.sqrt(arr[~good, 2]) > 0.5).all()
    assert set(statuses) == {STATUS_FIX, STATUS_GBAS_FIX}


def test_rear_lamps_show_motion_state_to_camera_only() -> None:
    rig = _rig(beams=32, columns=512)
    car = {"center": (12.0, 0.0, 0.75), "size": (4.5, 1.8, 1.5), "kind": "vehicle", "color": (40, 40, 200)}
    imgs, clouds = {}, {}
    for signal in ("tail", "brake", "hazard"):
        scene = static_scene([dict(car, signal=signal)], lighting="night")
        imgs[signal] = CameraRenderer(rig).render(scene, rng=None).astype(int)
        clouds[signal] = LidarSimulator(rig).scan(scene, np.random.default_rng(1)).tobytes()
    assert clouds["tail"] == clouds["brake"] == clouds["hazard"]
    amber = (imgs["hazard"][..., 0] > 200) & (imgs["hazard"][..., 1] > 120) & (imgs["hazard"][..., 2] < 60)
    bright_red = (imgs["brake"][..., 0] > 200) & (imgs["brake"][..., 1] < 80)
    assert amber.sum() > 0 and bright_red.sum() > 0
    assert ((imgs["tail"][..., 0] > 200) & (imgs["tail"][..., 1] < 80)).sum() < bright_red.sum()
    # a turn signal: amber on the signalled side only (+y, the vehicle's left, is the image's left here)
    cols = {}
    for signal in ("left", "right"):
        scene = static_scene([dict(car, signal=signal)], lighting="night")
        img = CameraRenderer(rig).render(scene, rng=None).astype(int)
        assert LidarSimulator(rig).scan(scene, np.random.default_rng(1)).tobytes() == clouds["tail"]
        amber = (img[..., 0] > 200) & (img[..., 1] > 120) & (img[..., 2] < 60)
        assert amber.sum() > 0
        cols[signal] = np.nonzero(amber)[1].mean()
    assert cols["left"] < imgs["tail"].shape[1] / 2 < cols["right"]


def test_a_car_waiting_at_the_stop_line_sees_the_signal_head() -> None:
    """The head over the ego lane stands 15-25 m beyond the line, inside the camera's view from the line."""
    from lmm_fusion.base.rig import transform_points
    from lmm_fusion.base.vocabulary import Scenario

    rig = SensorRig(camera=CameraModel(width=640, height=360))
    base_to_optical = np.linalg.inv(rig.camera_optical_to_base())
    for seed in range(12):
        w = World(np.random.default_rng(seed), [Scenario.TRAFFIC_LIGHT])
        ep = w.episode
        assert ep.lights
        for light in ep.lights:
            heads = [ep.actors[i] for i in light.housings]
            over_lane = [h for h in heads if abs(h.d - ep.lane_centre(ep.ego_lane)) < 1e-6]
            assert len(over_lane) == 1
            head = over_lane[0]
            assert 15.0 <= head.s - light.s_stop <= 25.0
            # a car in the middle of its lane, front bumper 1 m before the line: base_link is
            # DEFAULT_VEHICLE.front_offset behind the bumper (straight-road approximation)
            x = head.s - (light.s_stop - 1.0 - DEFAULT_VEHICLE.front_offset)
            lamp_base = np.array([[x, 0.0, head.z0 + head.height / 2]])
            u, v, z = rig.camera.k() @ transform_points(base_to_optical, lamp_base)[0]
            assert z > 0 and 0 <= u / z < rig.camera.width and 0 <= v / z < rig.camera.height, (seed, u / z, v / z)


def test_a_yawed_lidar_sees_the_same_obstacle() -> None:
    """Column culling follows the mount's yaw: a LiDAR turned half a turn (an Ouster's os_lidar) or a
    quarter sees a box ahead where the unturned one does (in base_link)."""
    from lmm_fusion.base.rig import transform_points
    from lmm_fusion.synth.lidar import LidarSimulator
    from lmm_fusion.synth.world import static_scene

    scene = static_scene([{"center": (15.0, 0.0, 0.75), "size": (4.0, 1.8, 1.5)}])
    nearest = []
    for yaw in (0.0, math.pi, -math.pi / 2):
        rig = SensorRig(lidar_mount=Mount(x=1.2, z=1.85, yaw=yaw), lidar=LidarModel(beams=32, columns=1024))
        pts = LidarSimulator(rig).scan(scene)
        xyz = np.stack([pts["x"], pts["y"], pts["z"]], -1)
        base = transform_points(rig.lidar_mount.matrix(), xyz)
        box = base[(np.abs(base[:, 1]) < 0.9) & (base[:, 2] > 0.3)]
        assert len(box) > 20, yaw
        nearest.append(float(box[:, 0].min()))
    np.testing.assert_allclose(nearest, 13.0, atol=0.05)
