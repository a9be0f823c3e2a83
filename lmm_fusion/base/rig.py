"""Sensor rig: where each sensor sits on the vehicle and its intrinsic model.

Frames follow REP-103/105: ``base_link`` at the centre of the rear axle on the ground, x forward,
y left, z up (metres, radians). The camera image frame is ``camera_optical`` (z forward, x right,
y down). The same rig drives the synthetic world, the CARLA bridge and the node's extrinsics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclass(frozen=True)
class VehicleGeometry:
    """The ego vehicle's footprint relative to ``base_link`` [m].

    ``length`` and ``width``: the body's extent; ``front_offset``: distance from ``base_link`` (the rear
    axle centre, REP-105) forward to the front bumper. Obstacle distances, the guard's free distance and
    the expert's gaps are measured from the bumper, so a longer bonnet means less room ahead.
    The body spans x in ``[front_offset - length, front_offset]``, y in ``[-width/2, width/2]``.
    """

    length: float = 4.6
    width: float = 1.9
    front_offset: float = 3.7

    @property
    def rear_offset(self) -> float:
        """x of the rear bumper in ``base_link`` [m] (negative: behind the rear axle)."""
        return self.front_offset - self.length

    def validate(self) -> None:
        """Raise ValueError naming the first implausible field (``vehicle.<name>`` and its value)."""
        for name, lo, hi in (("length", 0.5, 30.0), ("width", 0.3, 5.0), ("front_offset", 0.0, 30.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"vehicle.{name}={v!r}: must be a number in [{lo:g}, {hi:g}] m")
        if self.front_offset > self.length:
            # base_link is on the vehicle (the rear axle): the bumper cannot be farther ahead than the length.
            raise ValueError(f"vehicle.front_offset={self.front_offset!r}: must be <= vehicle.length="
                             f"{self.length!r} (base_link lies within the body)")


#: The default mid-size car (what the synthetic world and the shipped model were made with).
DEFAULT_VEHICLE = VehicleGeometry()


@dataclass(frozen=True)
class Mount:
    """Pose of a sensor body frame in ``base_link``: translation [m], roll/pitch/yaw [rad]."""

    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    roll: float = 0.0
    pitch: float = 0.0
    yaw: float = 0.0

    def rotation(self) -> np.ndarray:
        """3x3 rotation sensor->base_link (R = Rz(yaw) @ Ry(pitch) @ Rx(roll))."""
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
        ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
        rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
        return rz @ ry @ rx

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous transform sensor->base_link (float64)."""
        t = np.eye(4)
        t[:3, :3] = self.rotation()
        t[:3, 3] = (self.x, self.y, self.z)
        return t


#: Rotation from the optical frame (z fwd, x right, y down) to the camera body frame (x fwd, y left, z up).
OPTICAL_TO_BODY = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class CameraModel:
    """Pinhole camera. Intrinsics in pixels; ``hfov_deg`` sets fx=fy when fx is not given."""

    width: int = 1280
    height: int = 720
    hfov_deg: float = 90.0
    rate_hz: float = 20.0

    @property
    def fx(self) -> float:
        return self.width / 2.0 / math.tan(math.radians(self.hfov_deg) / 2.0)

    @property
    def fy(self) -> float:
        return self.fx

    @property
    def cx(self) -> float:
        return self.width / 2.0

    @property
    def cy(self) -> float:
        return self.height / 2.0

    def k(self) -> np.ndarray:
        """3x3 intrinsic matrix K."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])


@dataclass(frozen=True)
class LidarModel:
    """Spinning LiDAR: ``beams`` rings evenly spread over [vfov_min, vfov_max] degrees,
    ``columns`` azimuth steps per revolution, ranges in metres."""

    beams: int = 64
    columns: int = 2048
    vfov_min_deg: float = -25.0
    vfov_max_deg: float = 15.0
    min_range: float = 0.5
    max_range: float = 100.0
    range_noise_std: float = 0.02
    dropout: float = 0.01
    rate_hz: float = 10.0
    #: Divisor that brings the sensor's intensity to the model's 0..1 (e.g. 255 for a Velodyne or Livox,
    #: 65535 for a full-range 16-bit field); None = detected from the first cloud's range
    #: (``lmm_fusion.io.pointcloud.detect_intensity_scale``).
    intensity_scale: float | None = None
    #: Point fields the sensor's driver writes (one of :data:`LIDAR_LAYOUTS`; the synthetic LiDAR's output).
    layout: str = "default"


@dataclass(frozen=True)
class GnssModel:
    """GNSS receiver: horizontal/vertical noise std [m], rate [Hz], geodetic origin of ``map``."""

    rate_hz: float = 10.0
    horizontal_std: float = 0.05
    vertical_std: float = 0.1
    origin_lat: float = 48.137154
    origin_lon: float = 11.576124
    origin_alt: float = 520.0
    degraded_probability: float = 0.02


@dataclass(frozen=True)
class SensorRig:
    """The full rig; defaults describe a mid-size car with a roof LiDAR and a windscreen camera.
    ``vehicle`` is the car's footprint (:class:`VehicleGeometry`)."""

    camera_mount: Mount = field(default_factory=lambda: Mount(x=1.8, y=0.0, z=1.45, pitch=math.radians(3.0)))
    camera: CameraModel = field(default_factory=CameraModel)
    lidar_mount: Mount = field(default_factory=lambda: Mount(x=1.2, y=0.0, z=1.85))
    lidar: LidarModel = field(default_factory=LidarModel)
    gnss_mount: Mount = field(default_factory=lambda: Mount(x=0.5, y=0.0, z=1.6))
    gnss: GnssModel = field(default_factory=GnssModel)
    vehicle: VehicleGeometry = field(default_factory=VehicleGeometry)

    def camera_optical_to_base(self) -> np.ndarray:
        """4x4 transform camera_optical -> base_link."""
        t = self.camera_mount.matrix()
        t[:3, :3] = t[:3, :3] @ OPTICAL_TO_BODY
        return t


def transform_points(t: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to ``(N, >=3)`` points (x, y, z in the first columns) -> ``(N, 3)`` float32.

    Written as nine element-wise multiply-adds instead of a ``(N, 3) @ (3, 3)`` product: the matmul goes
    through a threaded BLAS, which on a loaded 2-core vehicle computer was measured 100x slower
    (56 ms vs 0.5 ms for 120k points) because its threads spin against the node's other threads.
    The arithmetic runs on contiguous columns (one transposing copy in, the result is the transpose of a
    ``(3, N)`` array, i.e. column-major): numpy's element-wise loops on the strided columns of an
    ``(N, 4)`` cloud are several times slower (0.92 vs 0.37 ms for 120k points, the same bits), and the
    BEV and the guard read the result column by column.
    """
    r = np.asarray(t, np.float64)
    x, y, z = np.ascontiguousarray(np.asarray(points[:, :3], np.float32).T)
    out = np.empty((3, x.shape[0]), np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 in a rotation entry gives NaN, as the product would
        for row in range(3):
            col = out[row]
            np.multiply(x, np.float32(r[row, 0]), out=col)
            col += np.float32(r[row, 1]) * y
            col += np.float32(r[row, 2]) * z
            col += np.float32(r[row, 3])
    return out.T


# ---------------------------------------------------------------------------------------- rig files
#: Point layouts the synthetic LiDAR can write (``LidarModel.layout``; the fields of each are in
#: :mod:`lmm_fusion.synth.lidar`): the project's own, and those of the Velodyne and Ouster ROS drivers.
LIDAR_LAYOUTS = ("default", "velodyne", "ouster")


class RigFileError(ValueError):
    """A rig file that cannot be used; the message names the file, the key and the value."""


#: Accepted ranges of the numeric rig-file keys (inclusive); keys not listed only need to be finite.
_LIMITS: dict[str, tuple[float, float]] = {
    "camera.width": (16, 16384), "camera.height": (16, 16384), "camera.hfov_deg": (1.0, 179.0),
    "camera.rate_hz": (0.1, 1000.0), "lidar.beams": (1, 512), "lidar.columns": (8, 8192),
    "lidar.vfov_min_deg": (-90.0, 90.0), "lidar.vfov_max_deg": (-90.0, 90.0), "lidar.min_range": (0.0, 1000.0),
    "lidar.max_range": (0.1, 1000.0), "lidar.range_noise_std": (0.0, 10.0), "lidar.dropout": (0.0, 1.0),
    "lidar.rate_hz": (0.1, 1000.0), "lidar.intensity_scale": (1e-6, 1e9), "gnss.rate_hz": (0.1, 1000.0),
    "gnss.horizontal_std": (0.0, 1000.0), "gnss.vertical_std": (0.0, 1000.0), "gnss.origin_lat": (-90.0, 90.0),
    "gnss.origin_lon": (-180.0, 180.0), "gnss.origin_alt": (-1000.0, 10000.0),
    "gnss.degraded_probability": (0.0, 1.0), "mount.x": (-100.0, 100.0), "mount.y": (-100.0, 100.0),
    "mount.z": (-100.0, 100.0),
}


def _number(where: str, key: str, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RigFileError(f"{where}: {key}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    if not math.isfinite(value):
        raise RigFileError(f"{where}: {key}={value!r}: must be finite")
    lim = _LIMITS.get("mount." + key.rsplit(".", 1)[-1]) if ".mount." in key else _LIMITS.get(key)
    if lim is not None and not lim[0] <= value <= lim[1]:
        raise RigFileError(f"{where}: {key}={value!r}: must be in [{lim[0]:g}, {lim[1]:g}]")
    return kind(value)


def _mount(where: str, key: str, spec: Any, default: Mount) -> Mount:
    """A :class:`Mount` from ``{x, y, z, roll|roll_deg, pitch|pitch_deg, yaw|yaw_deg}`` (missing keys keep
    ``default``'s values; angles in radians, or degrees with the ``_deg`` suffix)."""
    if not isinstance(spec, dict):
        raise RigFileError(f"{where}: {key}: expected a mapping of x, y, z, roll, pitch, yaw, got {spec!r}")
    values = {f: getattr(default, f) for f in ("x", "y", "z", "roll", "pitch", "yaw")}
    for k, v in spec.items():
        name = str(k)
        if name in ("x", "y", "z", "roll", "pitch", "yaw"):
            values[name] = float(_number(where, f"{key}.{name}", v, float))
        elif name in ("roll_deg", "pitch_deg", "yaw_deg"):
            if name[:-4] in spec:
                raise RigFileError(f"{where}: {key}: give {name[:-4]} or {name}, not both")
            values[name[:-4]] = math.radians(_number(where, f"{key}.{name}", v, float))
        else:
            raise RigFileError(f"{where}: {key}.{name}: unknown key (x, y, z, roll[_deg], pitch[_deg], yaw[_deg])")
    return Mount(**values)


def _model(where: str, section: str, spec: dict[str, Any], default: Any) -> Any:
    """``default`` (a frozen dataclass) with the keys of ``spec`` replaced, each checked by type and range."""
    kw: dict[str, Any] = {}
    names = {f.name: f for f in fields(default)}
    for k, v in spec.items():
        name, key = str(k), f"{section}.{k}"
        if name not in names:
            raise RigFileError(f"{where}: {key}: unknown key (one of: {', '.join(sorted(names))}, mount)")
        current = getattr(default, name)
        if name == "layout":
            if v not in LIDAR_LAYOUTS:
                raise RigFileError(f"{where}: {key}={v!r}: must be one of {', '.join(LIDAR_LAYOUTS)}")
            kw[name] = str(v)
        elif name == "intensity_scale" and v is None:
            kw[name] = None
        else:
            kind = int if isinstance(current, int) and not isinstance(current, bool) else float
            kw[name] = _number(where, key, v, kind)
    return replace(default, **kw)


def rig_from_dict(spec: Any, where: str = "rig", base: SensorRig | None = None) -> SensorRig:
    """A :class:`SensorRig` from a rig file's mapping (see ``docs/rig_file.md``); sections and keys left out
    keep ``base``'s (default: :class:`SensorRig`'s) values. Raises :class:`RigFileError` naming the key."""
    rig = base or SensorRig()
    if spec is None:
        return rig
    if not isinstance(spec, dict):
        raise RigFileError(f"{where}: expected a mapping with vehicle, camera, lidar, gnss; got {type(spec).__name__}")
    unknown = sorted(set(map(str, spec)) - {"vehicle", "camera", "lidar", "gnss"})
    if unknown:
        raise RigFileError(f"{where}: unknown section(s) {unknown} (vehicle, camera, lidar, gnss)")
    out: dict[str, Any] = {}
    for section, model_attr, mount_attr in (("camera", "camera", "camera_mount"), ("lidar", "lidar", "lidar_mount"),
                                            ("gnss", "gnss", "gnss_mount"), ("vehicle", "vehicle", None)):
        sec = spec.get(section)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise RigFileError(f"{where}: {section}: expected a mapping, got {sec!r}")
        sec = dict(sec)
        if mount_attr is not None and "mount" in sec:
            out[mount_attr] = _mount(where, f"{section}.mount", sec.pop("mount"), getattr(rig, mount_attr))
        out[model_attr] = _model(where, section, sec, getattr(rig, model_attr))
    rig = replace(rig, **out)
    if rig.lidar.vfov_min_deg >= rig.lidar.vfov_max_deg:
        raise RigFileError(f"{where}: lidar.vfov_min_deg={rig.lidar.vfov_min_deg!r} must be < lidar.vfov_max_deg="
                           f"{rig.lidar.vfov_max_deg!r}")
    if rig.lidar.min_range >= rig.lidar.max_range:
        raise RigFileError(f"{where}: lidar.min_range={rig.lidar.min_range!r} must be < lidar.max_range="
                           f"{rig.lidar.max_range!r}")
    try:
        rig.vehicle.validate()
    except ValueError as exc:
        raise RigFileError(f"{where}: {exc}") from None
    return rig


def load_rig(path: str | Path) -> SensorRig:
    """The :class:`SensorRig` of a YAML rig file (``config/rigs/*.yaml``; format in ``docs/rig_file.md``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RigFileError(f"{p}: cannot read the rig file: {exc.strerror or exc}") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RigFileError(f"{p}: not valid YAML: {exc}") from None
    return rig_from_dict(spec, str(p))
