"""Sensor rig: where each sensor sits on the vehicle and its intrinsic model.

Frames follow REP-103/105: ``base_link`` at the centre of the rear axle on the ground, x forward,
y left, z up (metres, radians). The camera image frame is ``camera_optical`` (z forward, x right,
y down). The same rig drives the synthetic world, the CARLA bridge and the node's extrinsics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Distance from base_link to the front bumper [m]; obstacle distances are measured from there.
EGO_FRONT_OFFSET = 3.7
EGO_LENGTH = 4.6
EGO_WIDTH = 1.9


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
    """The full rig; defaults describe a mid-size car with a roof LiDAR and a windscreen camera."""

    camera_mount: Mount = field(default_factory=lambda: Mount(x=1.8, y=0.0, z=1.45, pitch=math.radians(3.0)))
    camera: CameraModel = field(default_factory=CameraModel)
    lidar_mount: Mount = field(default_factory=lambda: Mount(x=1.2, y=0.0, z=1.85))
    lidar: LidarModel = field(default_factory=LidarModel)
    gnss_mount: Mount = field(default_factory=lambda: Mount(x=0.5, y=0.0, z=1.6))
    gnss: GnssModel = field(default_factory=GnssModel)

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
    """
    r = np.asarray(t, np.float64)
    x = np.asarray(points[:, 0], np.float32)
    y = np.asarray(points[:, 1], np.float32)
    z = np.asarray(points[:, 2], np.float32)
    out = np.empty((x.shape[0], 3), np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 in a rotation entry gives NaN, as the product would
        for row in range(3):
            col = out[:, row]
            np.multiply(x, np.float32(r[row, 0]), out=col)
            col += np.float32(r[row, 1]) * y
            col += np.float32(r[row, 2]) * z
            col += np.float32(r[row, 3])
    return out
