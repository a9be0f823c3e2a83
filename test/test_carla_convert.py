"""CARLA <-> project conversions against hand-computed values (no carla module needed)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from lmm_fusion.base.rig import DEFAULT_VEHICLE, Mount, SensorRig
from lmm_fusion.base.vocabulary import Light
from lmm_fusion.carla import convert as cc
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.gnss import GnssFix

HAVE_CARLA = importlib.util.find_spec("carla") is not None


def test_module_imports_without_carla() -> None:
    # A fresh interpreter with 'carla' made unimportable: the pure modules must not need it.
    code = ("import sys; sys.modules['carla'] = None\n"
            "import lmm_fusion.carla.convert, lmm_fusion.carla.control, lmm_fusion.carla.record\n"
            "import lmm_fusion.carla.route\n"
            "import lmm_fusion.carla.bridge\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------ camera
def test_bgra_to_rgb_hand_values() -> None:
    # 2x3 image; pixel (row, col) has B=10*row+col, G=100+.., R=200+.., A=255
    h, w = 2, 3
    raw = bytearray()
    for r in range(h):
        for c in range(w):
            raw += bytes([10 * r + c, 100 + 10 * r + c, 200 + 10 * r + c, 255])
    rgb = cc.bgra_to_rgb(bytes(raw), w, h)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [200, 100, 0]
    assert rgb[1, 2].tolist() == [212, 112, 12]
    assert rgb.flags.c_contiguous and rgb.flags.writeable


def test_bgra_to_rgb_accepts_memoryview_and_copies() -> None:
    buf = bytearray(np.arange(16, dtype=np.uint8).tobytes())
    rgb = cc.bgra_to_rgb(memoryview(buf), 2, 2)
    buf[2] = 99  # CARLA reuses its buffer: the image must not change
    assert rgb[0, 0].tolist() == [2, 1, 0]


@pytest.mark.parametrize(("nbytes", "w", "h", "needle"), [
    (4 * 6 - 1, 3, 2, "24"),
    (4 * 6 + 4, 3, 2, "24"),
    (0, 0, 2, "width"),
    (16, 2, -2, "height"),
    (16, 2.0, 2, "width"),
    (16, 2, 1 << 20, "height"),
])
def test_bgra_to_rgb_rejects_bad_sizes(nbytes: int, w: int, h: int, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        cc.bgra_to_rgb(bytes(nbytes), w, h)


def test_camera_intrinsics_from_fov() -> None:
    # 90 deg horizontal FOV: f = (W/2) / tan(45 deg) = W/2
    k = cc.camera_intrinsics(800, 600, 90.0)
    np.testing.assert_allclose(k, [[400, 0, 400], [0, 400, 300], [0, 0, 1]], atol=1e-9)
    # 60 deg: f = 640 / tan(30 deg) = 1108.5125...
    k = cc.camera_intrinsics(1280, 720, 60.0)
    assert k[0, 0] == pytest.approx(1108.51251, rel=1e-6) and k[1, 1] == k[0, 0]
    # same K as the rig's pinhole model, which the synthetic world renders with
    cam = SensorRig().camera
    np.testing.assert_allclose(cc.camera_intrinsics(cam.width, cam.height, cam.hfov_deg), cam.k())
    info = cc.camera_info_fields(800, 600, 90.0)
    assert info["p"].reshape(3, 4)[:, 3].tolist() == [0, 0, 0]
    np.testing.assert_allclose(info["p"].reshape(3, 4)[:, :3], info["k"].reshape(3, 3))
    for bad in (0.0, 180.0, -5.0):
        with pytest.raises(MessageError, match="fov"):
            cc.camera_intrinsics(800, 600, bad)


# ------------------------------------------------------------------------------------------- LiDAR
def test_lidar_left_to_right_handed() -> None:
    pts_carla = np.array([[10.0, 2.0, -1.0, 0.5],     # 10 m ahead, 2 m to the RIGHT (CARLA +y)
                          [0.0, -3.0, 0.5, 0.25]], np.float32)  # 3 m to the LEFT
    out = cc.lidar_to_points(pts_carla.tobytes())
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(out, [[10.0, -2.0, -1.0, 0.5], [0.0, 3.0, 0.5, 0.25]])


def test_lidar_empty_and_bad_buffers() -> None:
    assert cc.lidar_to_points(b"").shape == (0, 4)
    with pytest.raises(MessageError, match="multiple of 16"):
        cc.lidar_to_points(bytes(17))
    nan = np.array([[np.nan, 0, 0, 1]], np.float32).tobytes()
    with pytest.raises(MessageError, match="non-finite"):
        cc.lidar_to_points(nan)
    with pytest.raises(MessageError, match="uint8"):
        cc.lidar_to_points(np.zeros(4, np.float32))


# -------------------------------------------------------------------------------------------- GNSS
def test_gnss_fix_fields_and_covariance() -> None:
    rig = SensorRig()
    f = cc.gnss_to_fix(48.1, 11.5, 520.0, rig)
    assert isinstance(f, GnssFix) and math.isnan(f.stamp)  # unstamped unless given
    assert cc.gnss_to_fix(48.1, 11.5, 520.0, rig, stamp=12.5).stamp == 12.5
    assert (f.lat, f.lon, f.alt) == (48.1, 11.5, 520.0)
    assert f.covariance_type == 2 and f.status == 0
    h, v = rig.gnss.horizontal_std, rig.gnss.vertical_std
    np.testing.assert_allclose(f.covariance, [h * h, 0, 0, 0, h * h, 0, 0, 0, v * v])
    with pytest.raises(MessageError, match="latitude"):
        cc.gnss_to_fix(91.0, 0.0, 0.0, rig)
    with pytest.raises(MessageError, match="altitude"):
        cc.gnss_to_fix(0.0, 0.0, math.nan, rig)


#: Geo-references: mid-latitude, high latitude (north and south), southern hemisphere, the equator,
#: east and west of Greenwich.
ORIGINS = [(49.0, 8.0), (78.22, 15.65), (-33.92, 18.42), (-54.8, -68.3), (0.0, 0.0), (35.68, 139.77),
           (64.1, -21.9), (-77.85, 166.67)]
#: CARLA locations [m] (float32-exact: carla.Location stores float32), up to 5 km from the origin.
POINTS = [(x, y, z) for x in (-5000.0, -400.0, 0.0, 123.5, 2500.0) for y in (-4000.0, -400.0, 0.0, 400.0, 3000.25)
          for z in (0.0, 7.5)]


@pytest.mark.parametrize("projection", cc.GEO_PROJECTIONS)
@pytest.mark.parametrize(("lat0", "lon0"), ORIGINS)
def test_geo_reference_round_trip(projection: str, lat0: float, lon0: float) -> None:
    ref = cc.CarlaGeoReference(lat0, lon0, 3.0, projection)
    assert ref.to_geolocation(0.0, 0.0, 0.0) == pytest.approx((lat0, lon0, 3.0), abs=1e-12)
    for p in POINTS:
        back = ref.to_location(*ref.to_geolocation(*p))
        assert math.dist(back, p) < 1e-3, (p, back)


def test_geo_projection_hand_values() -> None:
    r = cc.CARLA_EARTH_RADIUS
    # 0.9.16's transverse Mercator: along the central meridian, latitude moves by y / (k0 R) ...
    tm = cc.CarlaGeoReference(49.0, 8.0)
    lat, lon, alt = tm.to_geolocation(0.0, 400.0, 2.0)
    assert lat - 49.0 == pytest.approx(math.degrees(400.0 / (cc.CARLA_TM_SCALE * r)), rel=1e-12)
    assert lon == 8.0 and alt == 2.0
    # ... with CARLA +y (south in the map) to higher latitude: mirrored north-south
    assert tm.to_geolocation(0.0, -400.0, 0.0)[0] < 49.0
    # 0.9.15's Mercator: (x, -y) metres at the origin's scale, so -y is north
    merc = cc.CarlaGeoReference(49.0, 8.0, 0.0, "mercator")
    lat, lon, _ = merc.to_geolocation(400.0, -400.0, 0.0)
    assert lon - 8.0 == pytest.approx(math.degrees(400.0 / (r * math.cos(math.radians(49.0)))), rel=1e-12)
    assert lat - 49.0 == pytest.approx(math.degrees(400.0 / r), rel=1e-3)
    with pytest.raises(ValueError, match="projection"):
        cc.CarlaGeoReference(0.0, 0.0, 0.0, "utm")
    with pytest.raises(ValueError, match="latitude"):
        cc.CarlaGeoReference(90.0, 0.0)


def test_detect_geo_reference_picks_the_formula_and_refuses_others() -> None:
    import pymap3d

    for projection in cc.GEO_PROJECTIONS:
        truth = cc.CarlaGeoReference(-33.92, 18.42, 5.0, projection)
        found = cc.detect_geo_reference(truth.to_geolocation)
        assert found.projection == projection
        assert (found.latitude, found.longitude, found.altitude) == pytest.approx((-33.92, 18.42, 5.0), abs=1e-12)
    # a WGS-84 tangent plane is no CARLA formula: refused, naming the errors
    with pytest.raises(ValueError, match=r"tmerc: .* m, mercator: .* m"):
        cc.detect_geo_reference(lambda x, y, z: pymap3d.enu2geodetic(x, -y, z, 49.0, 8.0, 0.0))


def test_gnss_fix_without_geo_reference_is_unchanged() -> None:
    f = cc.gnss_to_fix(48.1, 11.5, 520.0, SensorRig())
    assert (f.lat, f.lon, f.alt) == (48.1, 11.5, 520.0)


@pytest.mark.skipif(not HAVE_CARLA, reason="carla client (carla==0.9.16) not installed")
@pytest.mark.parametrize(("lat0", "lon0"), ORIGINS)
def test_geo_reference_inverts_the_carla_client(lat0: float, lon0: float) -> None:
    import carla
    import pymap3d
    from carla_xodr import straight_xodr

    m = carla.Map("geo", straight_xodr(lat0, lon0))

    def carla_geo(x: float, y: float, z: float) -> tuple[float, float, float]:
        g = m.transform_to_geolocation(carla.Location(x=x, y=y, z=z))
        return g.latitude, g.longitude, g.altitude

    ref = cc.detect_geo_reference(carla_geo)
    assert ref.projection == "tmerc" and (ref.latitude, ref.longitude) == pytest.approx((lat0, lon0), abs=1e-9)
    rig = SensorRig()
    g = rig.gnss
    worst = 0.0
    for p in POINTS:
        fix = carla_geo(*p)
        # CARLA's own formula, reproduced ...
        assert cc.geo_error_m(ref.to_geolocation(*p), fix) < 1e-6
        # ... and inverted: the fix's map position to well under a millimetre
        worst = max(worst, math.dist(ref.to_location(*fix), p))
        # through the bridge's conversion the node (WGS-84 ENU around its origin) gets the map frame (x, -y, z)
        f = cc.gnss_to_fix(*fix, rig, ref)
        e, n, u = pymap3d.geodetic2enu(f.lat, f.lon, f.alt, g.origin_lat, g.origin_lon, g.origin_alt)
        assert math.dist((e, n, u), (p[0], -p[1], p[2])) < 1e-3, p
    assert worst < 1e-3
    # A WGS-84 tangent plane around the map's geo-reference (not CARLA's formula) would put a fix taken
    # 400 m south of the origin (CARLA +y) 400 m north.
    fix = carla_geo(0.0, 400.0, 0.0)
    _, n_old, _ = pymap3d.geodetic2enu(*fix, lat0, lon0, 0.0)
    assert n_old == pytest.approx(400.0, rel=0.01)


# -------------------------------------------------------------------------------------- transforms
def _rz(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_mount_to_carla_hand_values() -> None:
    m = Mount(x=1.5, y=0.4, z=1.7, roll=math.radians(2), pitch=math.radians(5), yaw=math.radians(30))
    p = cc.mount_to_carla(m)
    assert (p.x, p.y, p.z) == pytest.approx((1.5, -0.4, 1.7))
    assert (p.roll, p.pitch, p.yaw) == pytest.approx((2.0, -5.0, -30.0))


def test_pitch_and_yaw_meaning() -> None:
    # A camera yawed 30 deg to the LEFT (ROS +yaw) looks towards CARLA -y (CARLA's left).
    p = cc.mount_to_carla(Mount(yaw=math.radians(30)))
    fwd = cc.carla_rotation_matrix(p.roll, p.pitch, p.yaw)[:, 0]
    assert fwd[1] == pytest.approx(-0.5) and fwd[0] == pytest.approx(math.cos(math.radians(30)))
    # A ROS +pitch lowers the nose; in CARLA the forward vector then points down (z < 0).
    p = cc.mount_to_carla(Mount(pitch=math.radians(10)))
    fwd = cc.carla_rotation_matrix(p.roll, p.pitch, p.yaw)[:, 0]
    assert fwd[2] == pytest.approx(-math.sin(math.radians(10)))


def test_rotation_round_trip() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        r, p, y = rng.uniform(-1.3, 1.3, 3)
        m = Mount(x=rng.normal(), y=rng.normal(), z=rng.normal(), roll=r, pitch=p, yaw=y)
        pose = cc.mount_to_carla(m)
        # same rigid transform seen in both frames: S M_carla S == M_ros
        np.testing.assert_allclose(cc.carla_matrix_to_ros(pose.matrix()), m.matrix(), atol=1e-12)
        back = cc.carla_to_mount(pose)
        np.testing.assert_allclose([back.x, back.y, back.z, back.roll, back.pitch, back.yaw],
                                   [m.x, m.y, m.z, r, p, y], atol=1e-12)
    # a point given in the sensor frame lands at the same place in both worlds
    m = Mount(x=1.0, y=0.5, z=2.0, yaw=0.3, pitch=-0.1, roll=0.05)
    q_ros = np.array([3.0, 1.0, -0.5, 1.0])
    q_carla = q_ros * [1, -1, 1, 1]
    out_carla = cc.mount_to_carla(m).matrix() @ q_carla
    np.testing.assert_allclose(out_carla * [1, -1, 1, 1], m.matrix() @ q_ros, atol=1e-12)


def test_base_link_in_actor() -> None:
    # Box centred 0.1 m ahead of the actor origin, 0.7 m up; half length 2.4 m, half height 0.75 m.
    bx, by, bz = cc.base_link_in_actor((0.1, 0.0, 0.7), (2.4, 0.9, 0.75))
    assert bx == pytest.approx(0.1 + 2.4 - DEFAULT_VEHICLE.front_offset) and by == 0.0 and bz == pytest.approx(-0.05)
    # front bumper (box front face) is DEFAULT_VEHICLE.front_offset ahead of base_link
    assert 0.1 + 2.4 - bx == pytest.approx(DEFAULT_VEHICLE.front_offset)
    pose = cc.mount_to_carla(Mount(x=1.2, z=1.85), (bx, by, bz))
    assert pose.x == pytest.approx(1.2 + bx) and pose.z == pytest.approx(1.8)


def test_sensor_periods_and_attributes() -> None:
    rig = SensorRig()
    assert cc.sensor_periods(rig, 20.0) == {"camera": 1, "lidar": 2, "gnss": 2}
    assert cc.sensor_periods(rig, 40.0) == {"camera": 2, "lidar": 4, "gnss": 4}
    for bad in (15.0, 10.0, 0.0, math.nan):
        with pytest.raises(ValueError, match="fps"):
            cc.sensor_periods(rig, bad)
    a = cc.sensor_attributes(rig, 20.0)
    assert a["camera"] == {"image_size_x": "1280", "image_size_y": "720", "fov": "90", "sensor_tick": "0.0"}
    lid = a["lidar"]
    assert lid["channels"] == "64" and lid["rotation_frequency"] == "20"
    assert int(lid["points_per_second"]) == 64 * 2048 * 20  # one full 64 x 2048 sweep per tick
    assert (lid["upper_fov"], lid["lower_fov"], lid["range"]) == ("15", "-25", "100")
    assert float(a["gnss"]["noise_lat_stddev"]) == pytest.approx(rig.gnss.horizontal_std / 111_320.0, rel=1e-3)
    assert all(isinstance(v, str) for d in a.values() for v in d.values())


def test_light_names() -> None:
    assert cc.light_from_carla("Red") is Light.RED
    assert cc.light_from_carla("TrafficLightState.Green") is Light.GREEN
    assert cc.light_from_carla("Off") is Light.NONE
    assert cc.light_from_carla("Purple") is Light.NONE


@pytest.mark.skipif(not HAVE_CARLA, reason="carla client (carla==0.9.16) not installed")
def test_carla_matrix_matches_carla_transform() -> None:
    import carla

    rng = np.random.default_rng(0)
    for _ in range(20):
        r, p, y = rng.uniform(-80, 80, 3)
        t = carla.Transform(carla.Location(x=1.0, y=-2.0, z=3.0), carla.Rotation(pitch=p, yaw=y, roll=r))
        np.testing.assert_allclose(np.array(t.get_matrix()), cc.CarlaPose(1.0, -2.0, 3.0, r, p, y).matrix(),
                                   atol=2e-6)


@pytest.mark.skipif(not HAVE_CARLA, reason="carla client (carla==0.9.16) not installed")
def test_mount_round_trip_through_carla_objects() -> None:
    import carla

    from lmm_fusion.carla.bridge import make_transform

    m = Mount(x=1.8, y=0.3, z=1.45, roll=0.02, pitch=math.radians(3), yaw=-0.4)
    t = make_transform(carla, cc.mount_to_carla(m))
    assert isinstance(t, carla.Transform)
    np.testing.assert_allclose(cc.carla_matrix_to_ros(np.array(t.get_matrix())), m.matrix(), atol=2e-6)
    # a sensor point expressed with carla's own transform equals the rig's in REP-103
    q = carla.Location(x=4.0, y=-1.0, z=0.5)  # CARLA axes: 1 m to the left
    w = t.transform(q)
    expect = m.matrix() @ np.array([4.0, 1.0, 0.5, 1.0])
    assert (w.x, -w.y, w.z) == pytest.approx(tuple(expect[:3]), abs=1e-5)
