"""Sensor messages <-> numpy, ROS-free and duck-typed on field names (rclpy, rosbags or wrappers).

Every reader raises :class:`MessageError` (naming the field and its value) for bad input.
"""

from lmm_fusion.io.common import make_header, make_time, stamp_to_sec
from lmm_fusion.io.errors import MessageError
from lmm_fusion.io.gnss import EgoMotionConfig, EgoMotionEstimator, EgoState, GnssFix, create_fix, read_fix
from lmm_fusion.io.image import create_compressed_image, create_image, read_image
from lmm_fusion.io.msgtypes import MsgTypes, rclpy_types, rosbags_types, typestore
from lmm_fusion.io.odometry import OdometrySpeed, read_odometry  # noqa: F401 (exported)
from lmm_fusion.io.pointcloud import create_cloud, read_points

__all__ = [
    "EgoMotionConfig",
    "EgoMotionEstimator",
    "EgoState",
    "GnssFix",
    "MessageError",
    "MsgTypes",
    "create_cloud",
    "create_compressed_image",
    "create_fix",
    "create_image",
    "make_header",
    "make_time",
    "rclpy_types",
    "read_fix",
    "read_image",
    "read_points",
    "rosbags_types",
    "stamp_to_sec",
    "typestore",
]
