"""Sensor message layouts of real drivers, rebuilt from a synthetic drive (for the conformance tests).

Not a test module (pytest collects only ``test_*.py``): the conformance tests import it. Each LiDAR
layout is the PointField list its ROS 2 driver publishes, with the driver's intensity unit; the
comment above each names the file of the driver's repository it was read from. Clouds are built
field by field from the synthetic cloud (x, y, z, intensity 0..1, ring), so a layout's bag carries
the same points as the drive it was made from, in the driver's encoding.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lmm_fusion.base import topics as T
from lmm_fusion.io import read_image, read_points, rosbags_types
from lmm_fusion.io.bags import BagMessage, BagWriter, read_bag
from lmm_fusion.io.common import make_time, stamp_to_sec
from lmm_fusion.io.image import create_compressed_image, create_image

#: numpy dtype -> PointField datatype constant.
_POINTFIELD = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 8}
#: Synthetic fields read from each cloud of the drive.
SOURCE_FIELDS = ("x", "y", "z", "intensity", "ring")


def struct(fields: Iterable[tuple[str, str, int]], point_step: int) -> np.dtype:
    """``(name, little-endian numpy type, offset)`` triples and ``point_step`` -> the record dtype."""
    names, formats, offsets = zip(*fields, strict=True)
    return np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets),
                     "itemsize": point_step})


@dataclass(frozen=True)
class CloudLayout:
    """One driver's PointCloud2: record dtype, organised or not, and how it encodes intensity.

    ``intensity``: synthetic 0..1 -> the driver's unit (cast to the field's type). ``organised``: one
    row per ring and one column per azimuth cell (Ouster), or with ``firing_rows`` one row per firing and
    one column per ring (Velodyne); the fields ``nan_fill`` of a cell without a return are NaN.
    ``rig_scale``: the ``lidar.intensity_scale`` a user sets for this sensor (None: detected).
    """

    name: str
    dtype: np.dtype
    intensity: Callable[[np.ndarray], np.ndarray]
    organised: bool = False
    bigendian: bool = False
    rig_scale: float | None = None
    firing_rows: bool = False
    nan_fill: tuple[str, ...] = ("x", "y", "z")
    is_dense: bool | None = None  # the flag the driver sets; None: True when every point is finite


# ros-drivers/velodyne, velodyne_pointcloud/src/lib/pointcloudXYZIRT.cpp (ROS 2 branch): x, y, z, intensity
# float32, ring uint16, time float32, offsets in order (setPointCloud2Fields: no alignment), point_step 22;
# intensity is the calibrated 0..255 return strength as float32. The organised variant
# (velodyne_pointcloud/src/lib/organized_cloudXYZIRT.cpp) adds one row per firing (newLine), the ring as the
# column, and sets x, y, z and intensity of a filtered return to NaN.
VELODYNE = struct([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 12),
                   ("ring", "<u2", 16), ("time", "<f4", 18)], 22)
# ouster-lidar/ouster-ros, ouster-ros/include/ouster_ros/os_point.h (ouster_ros::Point, EIGEN_ALIGN16):
# x, y, z (+ PCL's 4th float of padding), intensity float32 at 16, t uint32 (ns in the scan), reflectivity,
# ring, ambient uint16, range uint32 (mm) at 32, point_step 48. Organised HxW with NaN xyz for no return
# (ouster-ros/src/point_cloud_compose.h). ``intensity`` is the signal in photon counts (thousands).
OUSTER = struct([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 16), ("t", "<u4", 20),
                 ("reflectivity", "<u2", 24), ("ring", "<u2", 26), ("ambient", "<u2", 28), ("range", "<u4", 32)], 48)
# Livox-SDK/livox_ros_driver2, src/lddc.cpp (InitPointcloud2MsgHeader) with src/comm/comm.h (LivoxPointXyzrtlt,
# #pragma pack(1)): x, y, z, intensity float32, tag uint8 at 16, line uint8 at 17, timestamp float64 (ns) at
# 18, point_step 26; intensity is the reflectivity 0..255 as float32.
LIVOX = struct([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 12), ("tag", "u1", 16),
                ("line", "u1", 17), ("timestamp", "<f8", 18)], 26)
# HesaiTechnology/HesaiLidar_ROS_2.0, src/manager/source_driver_ros2.hpp (ToRosMsg, addPointField in order):
# x, y, z, intensity float32, ring uint16 at 16, timestamp float64 (s) at 18, point_step 26, NaN points
# removed (width = points kept); intensity 0..255 as float32.
HESAI = struct([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "<f4", 12), ("ring", "<u2", 16),
                ("timestamp", "<f8", 18)], 26)
# HesaiTechnology/HesaiLidar_ROS_2.0, src/manager/source_driver_ros2.hpp as of its SDK-branch change (the
# LidarPointXYZIRCAEDT cloud): x, y, z float32, intensity uint8 at 12, return_type uint8 at 13, channel
# uint16 at 14, azimuth, elevation, distance float32 at 16, 20, 24, time_stamp uint32 at 28, point_step 32.
HESAI_U8 = struct([("x", "<f4", 0), ("y", "<f4", 4), ("z", "<f4", 8), ("intensity", "u1", 12),
                   ("return_type", "u1", 13), ("channel", "<u2", 14), ("azimuth", "<f4", 16),
                   ("elevation", "<f4", 20), ("distance", "<f4", 24), ("time_stamp", "<u4", 28)], 32)

#: Photon counts of a fully reflective return in the Ouster layout (its signal is in the thousands).
OUSTER_COUNTS = 3000.0


def _to_255(i: np.ndarray) -> np.ndarray:
    return i * 255.0


def _to_u8(i: np.ndarray) -> np.ndarray:
    return np.round(i * 255.0)


def _to_counts(i: np.ndarray) -> np.ndarray:
    return np.round(i * OUSTER_COUNTS)


LIDAR_LAYOUTS: dict[str, CloudLayout] = {
    "velodyne_vlp16_organised": CloudLayout("velodyne", VELODYNE, _to_255, organised=True, firing_rows=True,
                                            nan_fill=("x", "y", "z", "intensity")),
    "velodyne_bigendian": CloudLayout("velodyne", VELODYNE, _to_255, bigendian=True),
    "ouster_os1_counts": CloudLayout("ouster", OUSTER, _to_counts, organised=True),
    "ouster_os1_counts_scale_set": CloudLayout("ouster", OUSTER, _to_counts, organised=True,
                                               rig_scale=OUSTER_COUNTS),
    "ouster_os1_bigendian": CloudLayout("ouster", OUSTER, _to_counts, organised=True, bigendian=True,
                                        rig_scale=OUSTER_COUNTS),
    "livox_mid360": CloudLayout("livox", LIVOX, _to_255),
    "hesai_float32": CloudLayout("hesai", HESAI, _to_255, is_dense=False),  # the driver always says False
    "hesai_uint8": CloudLayout("hesai", HESAI_U8, _to_u8, is_dense=False),
}


def _columns(pts: np.ndarray, columns: int) -> np.ndarray:
    """Azimuth cell of each point (0..columns-1), as a spinning LiDAR's column index."""
    az = np.arctan2(pts[:, 1], pts[:, 0])
    return np.floor((az + math.pi) / (2 * math.pi) * columns).astype(np.int64) % columns


def encode_cloud(types: Any, header: Any, pts: np.ndarray, layout: CloudLayout, beams: int, columns: int,
                 stamp: float) -> Any:
    """Synthetic ``(N, 5)`` points (x, y, z, intensity 0..1, ring) -> PointCloud2 in ``layout``."""
    n = len(pts)
    rng = np.random.default_rng(n)  # auxiliary fields only (ambient, tag): deterministic per cloud
    ring = pts[:, 4].astype(np.int64)
    if layout.organised:
        col = _columns(pts, columns)
        # A cell taken twice (rounding at a column edge) moves the later point to the next free cell of its
        # row, so no point is lost: decisions compare with the drive the cloud was made from.
        taken = np.zeros((beams, columns), bool)
        for k in range(n):
            r, c = ring[k], col[k]
            while taken[r, c]:
                c = (c + 1) % columns
            taken[r, c] = True
            col[k] = c
        rec = np.zeros((columns, beams) if layout.firing_rows else (beams, columns), layout.dtype)
        for name in layout.nan_fill:
            rec[name] = np.nan
        flat = rec.reshape(-1)
        idx = col * beams + ring if layout.firing_rows else ring * columns + col
    else:
        rec = np.zeros(n, layout.dtype)
        flat = rec
        idx = np.arange(n)
    rng_m = np.sqrt(np.sum(pts[:, :3].astype(np.float64) ** 2, axis=1))
    names = set(layout.dtype.names or ())
    for k, name in enumerate(("x", "y", "z")):
        flat[name][idx] = pts[:, k]
    flat["intensity"][idx] = layout.intensity(pts[:, 3].astype(np.float64))
    sweep = np.linspace(0.0, 0.1, n, endpoint=False)  # time within a 10 Hz sweep [s]
    values: dict[str, np.ndarray] = {
        "ring": ring, "channel": ring, "line": ring % 4, "time": sweep, "t": np.round(sweep * 1e9),
        "timestamp": (stamp + sweep) * (1e9 if layout.name == "livox" else 1.0), "time_stamp": np.round(sweep * 1e6),
        "reflectivity": np.round(pts[:, 3] * 255.0), "ambient": rng.integers(0, 800, n), "range": np.round(rng_m * 1e3),
        "distance": rng_m, "azimuth": np.degrees(np.arctan2(pts[:, 1], pts[:, 0])) % 360.0,
        "elevation": np.degrees(np.arcsin(np.clip(pts[:, 2] / np.maximum(rng_m, 1e-6), -1, 1))),
        "tag": rng.integers(0, 2, n) * 16, "return_type": np.zeros(n),
    }
    for name, v in values.items():
        if name in names:
            flat[name][idx] = v
    return make_cloud(types, header, rec, layout.bigendian, layout.is_dense)


def make_cloud(types: Any, header: Any, rec: np.ndarray, bigendian: bool = False, is_dense: bool | None = None
               ) -> Any:
    """A structured array ``(N,)`` or ``(H, W)`` -> PointCloud2 with its fields, offsets and byte order
    (``is_dense`` None: True when every x, y, z is finite)."""
    dtype = rec.dtype
    names = list(dtype.names or ())
    spec: dict[str, Any] = dict(dtype.fields or {})
    if bigendian:
        dtype = np.dtype({"names": names, "formats": [spec[n][0].newbyteorder(">") for n in names],
                          "offsets": [spec[n][1] for n in names], "itemsize": dtype.itemsize})
        rec = rec.astype(dtype)
        spec = dict(dtype.fields or {})
    height, width = (1, rec.shape[0]) if rec.ndim == 1 else rec.shape
    fields = [types.PointField(name=n, offset=int(spec[n][1]), datatype=_POINTFIELD[spec[n][0].str[1:]], count=1)
              for n in names]
    xyz = rec.reshape(-1)
    dense = bool(np.isfinite(xyz["x"]).all() and np.isfinite(xyz["y"]).all() and np.isfinite(xyz["z"]).all()) \
        if is_dense is None else is_dense
    return types.PointCloud2(header=header, height=int(height), width=int(width), fields=fields,
                             is_bigendian=bigendian, point_step=int(dtype.itemsize),
                             row_step=int(dtype.itemsize * width),
                             data=np.ascontiguousarray(rec).reshape(-1).view(np.uint8).copy(), is_dense=dense)


# ---------------------------------------------------------------- images
def yuy2(rgb: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` -> ``(H, W, 2)`` YUYV bytes (``yuv422_yuy2``), as OpenCV converts it back."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_YUY2)


def bayer_rggb(rgb: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` -> ``(H, W)`` mosaic: R at (even, even), G at (even, odd) and (odd, even), B at (odd, odd)."""
    out = np.empty(rgb.shape[:2], np.uint8)
    out[0::2, 0::2] = rgb[0::2, 0::2, 0]
    out[0::2, 1::2] = rgb[0::2, 1::2, 1]
    out[1::2, 0::2] = rgb[1::2, 0::2, 1]
    out[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return out


def raw_image(types: Any, header: Any, data: np.ndarray, encoding: str) -> Any:
    """An ``Image`` of ``data`` ``(H, W[, C])`` uint8 in ``encoding`` (rows unpadded)."""
    h, w = data.shape[:2]
    return types.Image(header=header, height=h, width=w, encoding=encoding, is_bigendian=False,
                       step=int(data[0].size), data=np.ascontiguousarray(data).reshape(-1).copy())


def encode_image(types: Any, header: Any, rgb: np.ndarray, kind: str, size: tuple[int, int] | None) -> Any:
    """The camera frame ``rgb`` as ``kind`` (an encoding, ``jpeg`` or ``png``), resized to ``size`` (w, h)."""
    if size is not None and (rgb.shape[1], rgb.shape[0]) != size:
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    if kind in ("jpeg", "png"):
        return create_compressed_image(types, header, rgb, kind, 90)
    if kind == "yuv422_yuy2":
        return raw_image(types, header, yuy2(rgb), kind)
    if kind == "bayer_rggb8":
        return raw_image(types, header, bayer_rggb(rgb), kind)
    return create_image(types, header, rgb, kind)


# ---------------------------------------------------------------- bags
def rewrite(src: Path, dst: Path, edit: Callable[[BagMessage], list[tuple[str, float, Any]]],
            storage: str = "mcap") -> Path:
    """Copy bag ``src`` to ``dst`` with each message replaced by ``edit(m)``: ``(topic, bag time, msg)`` rows
    (``[]`` drops it). Messages ``edit`` returns unchanged are copied as recorded bytes."""
    with BagWriter(dst, storage=storage) as w:
        for m in read_bag(src):
            for topic, t, msg in edit(m):
                if msg is None and m.raw is not None:
                    w.write_raw(topic, t, m.msgtype, m.raw)
                else:
                    w.write(topic, t, m.msg if msg is None else msg)
    return dst


def keep(m: BagMessage) -> list[tuple[str, float, Any]]:
    """The identity edit of :func:`rewrite`."""
    return [(m.topic, m.stamp_sec, None)]


def lidar_edit(layout: CloudLayout, beams: int, columns: int) -> Callable[[BagMessage], list[tuple[str, float, Any]]]:
    """An edit re-encoding every cloud of the drive into ``layout``."""
    types = rosbags_types()

    def edit(m: BagMessage) -> list[tuple[str, float, Any]]:
        if m.topic != T.LIDAR_POINTS:
            return keep(m)
        pts = read_points(m.msg, SOURCE_FIELDS)
        stamp = stamp_to_sec(m.msg.header.stamp)
        return [(m.topic, m.stamp_sec, encode_cloud(types, m.msg.header, pts, layout, beams, columns, stamp))]

    return edit


def camera_edit(kind: str, size: tuple[int, int] | None = None) -> Callable[[BagMessage], list[tuple[str, float, Any]]]:
    """An edit re-encoding every camera frame as ``kind`` (and the camera info to ``size``)."""
    types = rosbags_types()
    topic = T.CAMERA_COMPRESSED if kind in ("jpeg", "png") else T.CAMERA_IMAGE

    def edit(m: BagMessage) -> list[tuple[str, float, Any]]:
        if m.topic == T.CAMERA_IMAGE:
            return [(topic, m.stamp_sec, encode_image(types, m.msg.header, read_image(m.msg), kind, size))]
        if m.topic == T.CAMERA_INFO and size is not None:
            info = m.msg
            sx, sy = size[0] / info.width, size[1] / info.height
            k = np.asarray(info.k, np.float64).reshape(3, 3) * [[sx], [sy], [1.0]]
            p = np.asarray(info.p, np.float64).reshape(3, 4) * [[sx], [sy], [1.0]]
            return [(m.topic, m.stamp_sec, types.CameraInfo(
                header=info.header, height=size[1], width=size[0], distortion_model=info.distortion_model,
                d=info.d, k=k.reshape(-1), r=info.r, p=p.reshape(-1), binning_x=info.binning_x,
                binning_y=info.binning_y, roi=info.roi))]
        return keep(m)

    return edit


def gnss_edit(change: Callable[[int, Any], Any | None]) -> Callable[[BagMessage], list[tuple[str, float, Any]]]:
    """An edit replacing the ``k``-th fix by ``change(k, fix)`` (None keeps it)."""
    count = [0]

    def edit(m: BagMessage) -> list[tuple[str, float, Any]]:
        if m.topic != T.GNSS_FIX:
            return keep(m)
        k = count[0]
        count[0] += 1
        new = change(k, m.msg)
        return [(m.topic, m.stamp_sec, new)]

    return edit


def restamp(msg: Any, sec: float) -> Any:
    """``msg`` with its header stamped ``sec`` [s] (rosbags messages are dataclasses: a shallow copy)."""
    types = rosbags_types()
    header = types.Header(stamp=make_time(types, sec), frame_id=msg.header.frame_id)
    return type(msg)(**{**{f: getattr(msg, f) for f in msg.__dataclass_fields__}, "header": header})


def replace_fields(msg: Any, **values: Any) -> Any:
    """A copy of the rosbags message ``msg`` with ``values`` replaced."""
    return type(msg)(**{**{f: getattr(msg, f) for f in msg.__dataclass_fields__}, **values})


def truncate_mcap(src: Path, dst: Path, fraction: float) -> Path:
    """Copy bag folder ``src`` to ``dst`` with its MCAP file cut at ``fraction`` of its size (mid-chunk)."""
    shutil.copytree(src, dst)
    (mcap,) = dst.glob("*.mcap")
    size = mcap.stat().st_size
    with mcap.open("r+b") as f:
        f.truncate(int(size * fraction))
    return dst
