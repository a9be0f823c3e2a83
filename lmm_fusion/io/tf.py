"""``/tf_static`` of a :class:`~lmm_fusion.base.rig.SensorRig`: its sensor frames in ``base_link``.

One builder for every writer of the transforms: the synthetic drive, the CARLA recorder and offline
replay of a bag recorded without ``/tf_static`` (RViz and Foxglove need the frames to place the points
and the image).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.base.rig import SensorRig
from lmm_fusion.io.common import make_header
from lmm_fusion.io.msgtypes import MsgTypes


def quaternion_from_matrix(rot: np.ndarray) -> tuple[float, float, float, float]:
    """Unit quaternion (x, y, z, w) of a 3x3 rotation matrix.

    Shepperd's method: the largest of the trace and the diagonal terms picks the branch, so the
    divisor stays well away from zero for every rotation (180 degree turns included).
    """
    m = rot
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        w, x, y, z = 0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        w, x, y, z = (m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        w, x, y, z = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        w, x, y, z = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s
    n = math.sqrt(x * x + y * y + z * z + w * w)
    return (x / n, y / n, z / n, w / n)


def rig_transforms(rig: SensorRig) -> list[tuple[str, np.ndarray]]:
    """(child frame, 4x4 child -> ``base_link`` transform) of every sensor frame of the rig."""
    return [(topics.CAMERA_FRAME, rig.camera_optical_to_base()),
            (topics.LIDAR_FRAME, rig.lidar_mount.matrix()),
            (topics.GNSS_FRAME, rig.gnss_mount.matrix())]


def tf_static_msg(types: MsgTypes, rig: SensorRig, stamp: float) -> Any:
    """tf2_msgs/TFMessage of ``types`` stamped ``stamp`` [s]: ``base_link`` -> camera_optical, lidar, gnss."""
    out = []
    for child, t in rig_transforms(rig):
        qx, qy, qz, qw = quaternion_from_matrix(t[:3, :3])
        out.append(types.TransformStamped(
            header=make_header(types, stamp, topics.BASE_FRAME), child_frame_id=child,
            transform=types.Transform(translation=types.Vector3(x=float(t[0, 3]), y=float(t[1, 3]), z=float(t[2, 3])),
                                      rotation=types.Quaternion(x=qx, y=qy, z=qz, w=qw))))
    return types.TFMessage(transforms=out)


__all__ = ["quaternion_from_matrix", "rig_transforms", "tf_static_msg"]
