"""CARLA data <-> project frames and message fields; pure numpy, importable without ``carla``.

Frames. CARLA (Unreal Engine) is left-handed: x forward, y *right*, z up, angles in degrees. The
project follows REP-103: x forward, y *left*, z up, radians. The two differ by the mirror
``S = diag(1, -1, 1)``:

* points and translations: ``p_ros = S @ p_carla``, i.e. ``(x, -y, z)``;
* rotations: ``R_ros = S @ R_carla @ S``. Writing CARLA's rotation as ``M(roll, pitch, yaw)`` (the
  matrix ``carla.Transform.get_matrix()`` returns, see :func:`carla_rotation_matrix`) and the rig's
  as ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (:meth:`lmm_fusion.base.rig.Mount.rotation`), the identity
  ``S @ M(r, -p, -y) @ S == Rz(y) @ Ry(p) @ Rx(r)`` holds: **roll keeps its sign, pitch and yaw
  flip**. Why: a positive ROS yaw turns x towards +y (left), a positive CARLA yaw towards +y
  (right); a positive ROS pitch (about +y, left) lowers the nose, a positive CARLA pitch raises it;
  a positive roll lowers the right side in both.

The CARLA world frame maps to the ENU ``map`` frame the same way: CARLA x = east, CARLA y = south
(so ``-y`` = north), z = up.

GNSS. CARLA computes geolocations with its own spherical formula (:class:`CarlaGeoReference`);
:func:`gnss_to_fix` inverts it exactly, so a fix lands where it was taken in the ``map`` frame.

``base_link`` of the rig is the rear-axle centre on the ground; a CARLA vehicle's actor origin is
its own (model dependent) origin. :func:`base_link_in_actor` places ``base_link`` from the vehicle's
bounding box so that the front bumper is :attr:`lmm_fusion.base.rig.VehicleGeometry.front_offset` ahead of it, as in
the synthetic world (obstacle distances are measured from the bumper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymap3d

from lmm_fusion.base.rig import DEFAULT_VEHICLE, Mount, SensorRig
from lmm_fusion.base.vocabulary import Light
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.gnss import COVARIANCE_TYPE_DIAGONAL_KNOWN, STATUS_FIX, GnssFix

#: The mirror between CARLA's left-handed and REP-103's right-handed frames.
FLIP_Y = np.diag([1.0, -1.0, 1.0])

#: Bytes per LiDAR detection in CARLA's raw buffer: float32 x, y, z, intensity.
LIDAR_POINT_BYTES = 16
#: Bytes per camera pixel in CARLA's raw buffer: uint8 B, G, R, A.
CAMERA_PIXEL_BYTES = 4
#: Largest image side [px] and LiDAR detection count accepted (bounds before any allocation).
MAX_IMAGE_SIDE = 16384
MAX_LIDAR_POINTS = 10_000_000
#: Metres per degree of latitude (mean), used to turn the rig's GNSS noise [m] into CARLA's [deg].
METRES_PER_DEG_LAT = 111_320.0

#: ``str(carla.TrafficLightState.X)`` name -> project light state (Off/Unknown = no light governs).
CARLA_LIGHT_NAMES: dict[str, Light] = {
    "Red": Light.RED, "Yellow": Light.YELLOW, "Green": Light.GREEN, "Off": Light.NONE, "Unknown": Light.NONE,
}


# ---------------------------------------------------------------------------------------------- buffers
def _as_bytes(field: str, raw: Any) -> np.ndarray:
    """Raw buffer (bytes, memoryview, numpy array, CARLA ``raw_data``) -> 1-D uint8 view, no copy."""
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8:
            raise MessageError(f"{field}: expected uint8 bytes, got array of {raw.dtype}")
        return raw.reshape(-1)
    try:
        return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{field}: not a byte buffer ({type(raw).__name__}): {exc}") from None


def bgra_to_rgb(raw: Any, width: int, height: int) -> np.ndarray:
    """CARLA camera ``raw_data`` (BGRA, 8 bit, row-major) -> ``(height, width, 3)`` uint8 RGB (a copy).

    Raises :class:`MessageError` when ``width``/``height`` are not positive integers within
    :data:`MAX_IMAGE_SIDE` or the buffer length differs from ``width * height * 4``.
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 < int(v) <= MAX_IMAGE_SIDE:
            raise MessageError(f"camera.{name}: expected an integer in 1..{MAX_IMAGE_SIDE}, got {v!r}")
    buf = _as_bytes("camera.raw_data", raw)
    expected = int(width) * int(height) * CAMERA_PIXEL_BYTES
    if buf.size != expected:
        raise MessageError(f"camera.raw_data: {buf.size} bytes, expected width*height*4 = "
                           f"{width}*{height}*4 = {expected}")
    bgra = buf.reshape(int(height), int(width), CAMERA_PIXEL_BYTES)
    # Channels 2, 1, 0 = R, G, B; the alpha channel carries nothing for an RGB camera.
    return np.ascontiguousarray(bgra[:, :, 2::-1])


def lidar_to_points(raw: Any) -> np.ndarray:
    """CARLA ray-cast LiDAR ``raw_data`` -> ``(N, 4)`` float32 ``x, y, z, intensity`` in REP-103.

    The buffer holds float32 (x, y, z, intensity) per detection in the sensor's left-handed frame;
    y is negated to get the right-handed sensor frame (x forward, y left, z up). Raises
    :class:`MessageError` when the length is not a multiple of 16 bytes, exceeds
    :data:`MAX_LIDAR_POINTS` detections or holds non-finite coordinates.
    """
    buf = _as_bytes("lidar.raw_data", raw)
    if buf.size % LIDAR_POINT_BYTES:
        raise MessageError(f"lidar.raw_data: {buf.size} bytes is not a multiple of {LIDAR_POINT_BYTES} "
                           "(float32 x, y, z, intensity)")
    n = buf.size // LIDAR_POINT_BYTES
    if n > MAX_LIDAR_POINTS:
        raise MessageError(f"lidar.raw_data: {n} detections exceed the bound {MAX_LIDAR_POINTS}")
    # One copy: the result must be writable (y is negated) and must not alias CARLA's buffer, which
    # the server reuses once the callback returns.
    pts = buf.view("<f4").reshape(n, 4).astype(np.float32, copy=True)
    if not np.isfinite(pts[:, :3]).all():
        bad = int((~np.isfinite(pts[:, :3])).any(axis=1).sum())
        raise MessageError(f"lidar.raw_data: {bad} of {n} detections have non-finite coordinates")
    pts[:, 1] *= -1.0
    return pts


# ------------------------------------------------------------------------------------------------ GNSS
def gnss_covariance(horizontal_std: float, vertical_std: float) -> np.ndarray:
    """NavSatFix ``position_covariance`` (9,) float64, row-major ENU, diagonal [m^2]."""
    for name, v in (("horizontal_std", horizontal_std), ("vertical_std", vertical_std)):
        if not (math.isfinite(v) and v >= 0.0):
            raise MessageError(f"gnss.{name}: expected a finite std >= 0 m, got {v!r}")
    cov = np.zeros(9, np.float64)
    cov[0] = cov[4] = horizontal_std ** 2
    cov[8] = vertical_std ** 2
    return cov


#: CARLA's Earth radius (``EARTH_RADIUS_EQUA`` in LibCarla ``geom/GeoLocation.cpp``) [m].
CARLA_EARTH_RADIUS = 6378137.0
#: Scale factor ``k0`` of CARLA 0.9.16's spherical transverse Mercator (``GeoLocation.cpp``).
CARLA_TM_SCALE = 0.9996
#: CARLA's geolocation formulas, newest first (see :class:`CarlaGeoReference`).
GEO_PROJECTIONS = ("tmerc", "mercator")
#: Probe locations (CARLA x, y, z [m]) at which :func:`detect_geo_reference` compares the formulas.
GEO_PROBES = ((1500.0, 0.0, 0.0), (0.0, 1500.0, 0.0), (-900.0, -2100.0, 12.0))
#: Largest disagreement [m] between a formula and the map's own geolocations that still identifies it.
GEO_MATCH_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CarlaGeoReference:
    """A CARLA map's geo-reference and the projection CARLA computes its geolocations with.

    ``latitude``, ``longitude`` [deg] and ``altitude`` [m] are what the map reports for the world
    origin (``map.transform_to_geolocation(Location(0, 0, 0))``). ``projection`` names CARLA's formula
    (LibCarla ``geom/GeoLocation.cpp``, ``GeoLocation::Transform``; the GNSS sensor and
    ``transform_to_geolocation`` both call it), on a sphere of radius :data:`CARLA_EARTH_RADIUS`:

    * ``"tmerc"`` (CARLA 0.9.16): the inverse of a spherical transverse Mercator with scale
      :data:`CARLA_TM_SCALE` around the origin, fed with the location's ``(x, y)`` **as they are**.
      Latitude therefore grows with CARLA ``+y``, which is south in the map (CARLA x = east,
      -y = north): CARLA 0.9.16's geolocations are mirrored north-south against its own map;
    * ``"mercator"`` (CARLA 0.9.15 and earlier): a Mercator projection scaled by ``cos(latitude)``
      of the origin, fed with ``(x, -y)``, so latitude grows northward.

    Altitude is ``altitude + z`` in both. :meth:`to_location` inverts :meth:`to_geolocation` exactly
    (to rounding), which is what turns a CARLA fix back into the map position it was taken at.
    """

    latitude: float
    longitude: float
    altitude: float = 0.0
    projection: str = "tmerc"

    def __post_init__(self) -> None:
        if self.projection not in GEO_PROJECTIONS:
            raise ValueError(f"projection: expected one of {GEO_PROJECTIONS}, got {self.projection!r}")
        if not (math.isfinite(self.latitude) and abs(self.latitude) < 90.0 and math.isfinite(self.longitude)):
            raise ValueError(f"geo-reference: expected a latitude in (-90, 90) and a finite longitude [deg], "
                             f"got ({self.latitude!r}, {self.longitude!r})")

    def to_geolocation(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """CARLA location (x, y, z) [m] -> (latitude, longitude [deg], altitude [m]), as CARLA computes it."""
        r, phi0 = CARLA_EARTH_RADIUS, math.radians(self.latitude)
        if self.projection == "tmerc":
            d = x / (CARLA_TM_SCALE * r)
            e = y / (CARLA_TM_SCALE * r) + phi0
            lat = math.degrees(math.asin(math.sin(e) / math.cosh(d)))
            lon = self.longitude + math.degrees(math.atan2(math.sinh(d), math.cos(e)))
        else:
            s = math.cos(phi0)
            my = s * r * math.log(math.tan((90.0 + self.latitude) * math.pi / 360.0)) - y
            lon = self.longitude + math.degrees(x / (s * r))
            lat = 360.0 * math.atan(math.exp(my / (r * s))) / math.pi - 90.0
        return lat, lon, self.altitude + z

    def to_location(self, lat: float, lon: float, alt: float) -> tuple[float, float, float]:
        """Inverse of :meth:`to_geolocation`: (latitude, longitude [deg], altitude [m]) -> CARLA (x, y, z) [m]."""
        r, phi0 = CARLA_EARTH_RADIUS, math.radians(self.latitude)
        phi = math.radians(lat)
        dlam = math.radians(math.remainder(lon - self.longitude, 360.0))
        if self.projection == "tmerc":
            k = CARLA_TM_SCALE * r
            x = k * math.atanh(math.cos(phi) * math.sin(dlam))
            # atan2(sin phi, cos phi cos dlam) == atan(tan phi / cos dlam) for |dlam| < 90 deg, and stays
            # well conditioned near the poles.
            y = k * (math.atan2(math.sin(phi), math.cos(phi) * math.cos(dlam)) - phi0)
        else:
            s = math.cos(phi0)
            x = s * r * dlam
            y = s * r * (math.log(math.tan((90.0 + self.latitude) * math.pi / 360.0))
                         - math.log(math.tan((90.0 + lat) * math.pi / 360.0)))
        return x, y, alt - self.altitude


def geo_error_m(a: Sequence[float], b: Sequence[float]) -> float:
    """Ground distance [m] between two (lat, lon, alt) close to each other (local flat approximation),
    altitude difference included."""
    north = math.radians(a[0] - b[0]) * CARLA_EARTH_RADIUS
    east = math.radians(math.remainder(a[1] - b[1], 360.0)) * CARLA_EARTH_RADIUS * math.cos(math.radians(a[0]))
    return math.sqrt(north * north + east * east + (a[2] - b[2]) ** 2)


def detect_geo_reference(transform_to_geolocation: Callable[[float, float, float], Sequence[float]]
                         ) -> CarlaGeoReference:
    """The :class:`CarlaGeoReference` that reproduces a map's geolocations.

    ``transform_to_geolocation(x, y, z)`` returns the map's (latitude, longitude, altitude) of a CARLA
    location (the bridge passes ``map.transform_to_geolocation``). The origin comes from (0, 0, 0); each
    formula of :data:`GEO_PROJECTIONS` is compared at :data:`GEO_PROBES` km away, and the first within
    :data:`GEO_MATCH_TOLERANCE` everywhere is returned. Raises ValueError naming the errors when none
    matches (another CARLA version with another formula: fixes could not be turned back into map positions).
    """
    lat0, lon0, alt0 = (float(v) for v in transform_to_geolocation(0.0, 0.0, 0.0))
    errors = {}
    for projection in GEO_PROJECTIONS:
        ref = CarlaGeoReference(lat0, lon0, alt0, projection)
        errors[projection] = max(geo_error_m(ref.to_geolocation(*p), transform_to_geolocation(*p)) for p in GEO_PROBES)
        if errors[projection] <= GEO_MATCH_TOLERANCE:
            return ref
    found = ", ".join(f"{k}: {v:.3g} m" for k, v in errors.items())
    raise ValueError(f"the map's geolocations match none of CARLA's known projections ({found} off at "
                     f"{len(GEO_PROBES)} probe points); GNSS fixes cannot be turned back into map positions")


def carla_fix_to_enu(lat: float, lon: float, alt: float, geo: CarlaGeoReference) -> tuple[float, float, float]:
    """A CARLA GNSS fix -> where it was taken in the ENU ``map`` frame (east, north, up [m]).

    CARLA's projection is inverted exactly (:meth:`CarlaGeoReference.to_location`) to the CARLA location,
    which is then mirrored into ENU: ``(x, -y, z)``.
    """
    x, y, z = geo.to_location(lat, lon, alt)
    return x, -y, z


def reanchor_fix(lat: float, lon: float, alt: float, geo: CarlaGeoReference, dst_origin: Sequence[float]
                 ) -> tuple[float, float, float]:
    """Move a CARLA fix to the rig's geodetic origin, keeping where it was taken in the ``map`` frame.

    The fix's ENU position in ``map`` (:func:`carla_fix_to_enu`) is placed around ``dst_origin``
    (lat [deg], lon [deg], alt [m]) with the WGS-84 conversion the node's ego-motion estimator inverts
    (``pymap3d``, :class:`lmm_fusion.io.gnss.EgoMotionEstimator`), so the node recovers the map position.
    Returns (lat [deg], lon [deg], alt [m]).
    """
    e, n, u = carla_fix_to_enu(lat, lon, alt, geo)
    out = pymap3d.enu2geodetic(e, n, u, *dst_origin)
    return float(out[0]), float(out[1]), float(out[2])


def gnss_to_fix(lat: float, lon: float, alt: float, rig: SensorRig,
                geo: CarlaGeoReference | None = None, stamp: float = math.nan) -> GnssFix:
    """CARLA ``GnssMeasurement`` (latitude, longitude [deg], altitude [m]) -> :class:`GnssFix`.

    With ``geo`` (the map's geo-reference, :func:`detect_geo_reference`) the fix is re-anchored to the
    rig's origin (:func:`reanchor_fix`) so the node's configured origin applies unchanged and its ENU
    positions are the map frame's. The covariance is the rig's GNSS noise model (the same std the
    CARLA sensor's noise is configured with), status STATUS_FIX. ``stamp`` [s]: the measurement's sim
    time; NaN when not given (the bridge stamps the NavSatFix header from its tick, and
    :class:`~lmm_fusion.io.gnss.EgoMotionEstimator` refuses an unstamped fix rather than taking it at time 0).
    """
    for name, v, lim in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
        if not (math.isfinite(v) and abs(v) <= lim):
            raise MessageError(f"gnss.{name}: expected a finite value within +-{lim} deg, got {v!r}")
    if not math.isfinite(alt):
        raise MessageError(f"gnss.altitude: expected a finite value [m], got {alt!r}")
    g = rig.gnss
    if geo is not None:
        lat, lon, alt = reanchor_fix(lat, lon, alt, geo, (g.origin_lat, g.origin_lon, g.origin_alt))
    return GnssFix(float(stamp), float(lat), float(lon), float(alt), STATUS_FIX,
                   gnss_covariance(g.horizontal_std, g.vertical_std), COVARIANCE_TYPE_DIAGONAL_KNOWN)


# ---------------------------------------------------------------------------------------------- camera
def camera_intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """3x3 K of CARLA's pinhole camera: square pixels, ``fx = fy = width / (2 tan(fov/2))``,
    principal point at the image centre ``(width/2, height/2)``; ``fov_deg`` is the horizontal FOV."""
    if not (0.0 < fov_deg < 180.0):
        raise MessageError(f"camera.fov: expected degrees in (0, 180), got {fov_deg!r}")
    if width <= 0 or height <= 0:
        raise MessageError(f"camera.image_size: expected positive width/height, got {width}x{height}")
    f = width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def camera_info_fields(width: int, height: int, fov_deg: float) -> dict[str, Any]:
    """``sensor_msgs/CameraInfo`` fields (no header) of an undistorted CARLA camera:
    ``k`` (9,), ``p`` (12,) = [K | 0], ``r`` identity (9,), ``d`` empty, ``distortion_model``."""
    k = camera_intrinsics(width, height, fov_deg)
    p = np.zeros((3, 4))
    p[:, :3] = k
    return {"height": int(height), "width": int(width), "distortion_model": "plumb_bob",
            "d": np.zeros(5), "k": k.reshape(9), "r": np.eye(3).reshape(9), "p": p.reshape(12)}


# ------------------------------------------------------------------------------------------ transforms
def carla_rotation_matrix(roll_deg: float, pitch_deg: float, yaw_deg: float) -> np.ndarray:
    """3x3 rotation body->world of a ``carla.Rotation`` in CARLA's left-handed frame (the rotation
    block of ``carla.Transform.get_matrix()``); angles in degrees."""
    cr, sr = math.cos(math.radians(roll_deg)), math.sin(math.radians(roll_deg))
    cp, sp = math.cos(math.radians(pitch_deg)), math.sin(math.radians(pitch_deg))
    cy, sy = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    return np.array([
        [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr],
        [cp * sy, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr],
        [sp, -cp * sr, cp * cr],
    ])


@dataclass(frozen=True)
class CarlaPose:
    """Arguments of ``carla.Transform(carla.Location(x, y, z), carla.Rotation(pitch, yaw, roll))``:
    metres and degrees in CARLA's left-handed frame."""

    x: float
    y: float
    z: float
    roll: float
    pitch: float
    yaw: float

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous transform in CARLA's frame (what ``get_matrix()`` returns)."""
        t = np.eye(4)
        t[:3, :3] = carla_rotation_matrix(self.roll, self.pitch, self.yaw)
        t[:3, 3] = (self.x, self.y, self.z)
        return t


def mount_to_carla(mount: Mount, base_in_actor: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> CarlaPose:
    """Rig mount (sensor pose in ``base_link``, REP-103, radians) -> CARLA attachment pose relative to
    the vehicle actor: ``(x, -y, z)`` and ``(roll, -pitch, -yaw)`` in degrees.

    ``base_in_actor`` is ``base_link``'s origin in the actor frame, REP-103 axes
    (:func:`base_link_in_actor`); ``base_link`` and the actor share their orientation.
    """
    bx, by, bz = base_in_actor
    return CarlaPose(x=mount.x + bx, y=-(mount.y + by), z=mount.z + bz, roll=math.degrees(mount.roll),
                     pitch=-math.degrees(mount.pitch), yaw=-math.degrees(mount.yaw))


def carla_to_mount(pose: CarlaPose, base_in_actor: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Mount:
    """Inverse of :func:`mount_to_carla`."""
    bx, by, bz = base_in_actor
    return Mount(x=pose.x - bx, y=-pose.y - by, z=pose.z - bz, roll=math.radians(pose.roll),
                 pitch=-math.radians(pose.pitch), yaw=-math.radians(pose.yaw))


def carla_matrix_to_ros(m: np.ndarray) -> np.ndarray:
    """4x4 transform in CARLA's frame -> the same transform in REP-103 (``S @ m @ S``, S = diag(1,-1,1,1))."""
    s = np.diag([1.0, -1.0, 1.0, 1.0])
    return s @ np.asarray(m, np.float64) @ s


def base_link_in_actor(bbox_location: Sequence[float], bbox_extent: Sequence[float],
                       front_offset: float = DEFAULT_VEHICLE.front_offset) -> tuple[float, float, float]:
    """``base_link`` origin in the vehicle actor frame (REP-103 axes, metres) from the vehicle's
    ``bounding_box`` (``location`` = box centre in the actor frame, CARLA axes; ``extent`` = half sizes).

    x: ``front_offset`` [m] (the rig's ``vehicle.front_offset``) behind the front face of the box; y: the
    box centre line; z: the box bottom (the ground, for a vehicle resting on its wheels).
    """
    cx, cy, cz = (float(v) for v in bbox_location)
    ex, _, ez = (float(v) for v in bbox_extent)
    return (cx + ex - front_offset, -cy, cz - ez)


# ---------------------------------------------------------------------------------------- blueprints
def sensor_periods(rig: SensorRig, fps: float) -> dict[str, int]:
    """Ticks between kept frames per sensor at ``fps`` simulation ticks/s: ``round(fps / rate_hz)``.

    Raises ValueError naming the sensor when its rate exceeds ``fps`` or ``fps`` is not (within 1 %)
    a multiple of it, since a frame can only be kept on a tick.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    periods: dict[str, int] = {}
    rates = (("camera", rig.camera.rate_hz), ("lidar", rig.lidar.rate_hz), ("gnss", rig.gnss.rate_hz))
    for name, rate in rates:
        ratio = fps / rate
        k = round(ratio)
        if k < 1 or abs(ratio - k) > 0.01 * ratio:
            raise ValueError(f"fps: {fps} is not a multiple of the {name} rate {rate} Hz")
        periods[name] = k
    return periods


def sensor_attributes(rig: SensorRig, fps: float, geo_lat_deg: float = 0.0, seed: int = 0
                      ) -> dict[str, dict[str, str]]:
    """Blueprint attributes (string values, as ``bp.set_attribute`` wants) per sensor from the rig.

    Keys ``camera`` (``sensor.camera.rgb``), ``lidar`` (``sensor.lidar.ray_cast``), ``gnss``
    (``sensor.other.gnss``). Every sensor fires on every tick (``sensor_tick`` 0) and the bridge
    keeps the frames due at the rig rates by frame number (:func:`sensor_periods`): CARLA's
    ``sensor_tick`` is time-based and its phase against the frame counter is not specified. The LiDAR
    turns once per tick (``rotation_frequency`` = fps), so every kept cloud is one full sweep taken at
    one instant, like the synthetic world's, as long as every tick lasts ``1/fps``: the bridge sets
    that fixed step in both modes and drops a measurement of a tick of another length.
    ``points_per_second`` is sized for ``beams * columns`` detections per sweep. GNSS noise std [m]
    becomes degrees at latitude ``geo_lat_deg``.
    """
    cam, lid, gnss = rig.camera, rig.lidar, rig.gnss
    lat_m = METRES_PER_DEG_LAT
    lon_m = METRES_PER_DEG_LAT * max(math.cos(math.radians(geo_lat_deg)), 1e-6)
    return {
        "camera": {"image_size_x": str(cam.width), "image_size_y": str(cam.height),
                   "fov": f"{cam.hfov_deg:g}", "sensor_tick": "0.0"},
        "lidar": {"channels": str(lid.beams), "range": f"{lid.max_range:g}",
                  "points_per_second": str(round(lid.beams * lid.columns * fps)),
                  "rotation_frequency": f"{fps:g}", "upper_fov": f"{lid.vfov_max_deg:g}",
                  "lower_fov": f"{lid.vfov_min_deg:g}", "horizontal_fov": "360",
                  "noise_stddev": f"{lid.range_noise_std:g}", "dropoff_general_rate": f"{lid.dropout:g}",
                  "dropoff_intensity_limit": "1.0", "dropoff_zero_intensity": "0.0",
                  "noise_seed": str(seed), "sensor_tick": "0.0"},
        "gnss": {"noise_lat_stddev": f"{gnss.horizontal_std / lat_m:.3e}",
                 "noise_lon_stddev": f"{gnss.horizontal_std / lon_m:.3e}",
                 "noise_alt_stddev": f"{gnss.vertical_std:g}", "noise_seed": str(seed + 1),
                 "sensor_tick": "0.0"},
    }


def light_from_carla(state: Any) -> Light:
    """``carla.TrafficLightState`` (or its name) -> :class:`Light`; unknown names -> ``Light.NONE``."""
    name = str(state).rsplit(".", 1)[-1]
    return CARLA_LIGHT_NAMES.get(name, Light.NONE)
