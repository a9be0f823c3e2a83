"""Message classes from either world: rosbags (pure Python, for bags) or rclpy (for DDS).

Every builder in the project takes a :class:`MsgTypes` and constructs messages with *all* fields
given as keywords, which both rosbags dataclasses and rclpy classes accept. Readers never need this:
they are duck-typed on field names.
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.typesys import Stores, get_types_from_msg, get_typestore

#: Package name of the interfaces before they moved into the ``lmm_fusion`` package (still read from bags).
LEGACY_MSG_PACKAGE = "lmm_fusion_msgs"

#: Definitions that differ under the earlier package name: its ``ModalityStatus`` had no source stamp (nor
#: reason), its ``SceneAssessment`` no ego speed.
_LEGACY_DEFINITIONS: dict[str, str] = {
    "ModalityStatus": "string name\nbool used\nfloat32 age\nfloat32 attention_share\n",
    "SceneAssessment": (  # fields only (constants do not change the wire format)
        "std_msgs/Header header\nuint8 risk_level\nfloat32[3] risk_probabilities\nfloat32 time_to_collision\n"
        "float32 nearest_obstacle_distance\nuint8 traffic_light_state\nfloat32[4] traffic_light_probabilities\n"
        "ModalityStatus[] modalities\nbool degraded\nbool valid\n"),
}

#: Message types the project uses, as (attribute name, ROS type name).
_TYPES: tuple[tuple[str, str], ...] = (
    ("Time", "builtin_interfaces/msg/Time"),
    ("Header", "std_msgs/msg/Header"),
    ("String", "std_msgs/msg/String"),
    ("ColorRGBA", "std_msgs/msg/ColorRGBA"),
    ("PointField", "sensor_msgs/msg/PointField"),
    ("PointCloud2", "sensor_msgs/msg/PointCloud2"),
    ("Image", "sensor_msgs/msg/Image"),
    ("CompressedImage", "sensor_msgs/msg/CompressedImage"),
    ("CameraInfo", "sensor_msgs/msg/CameraInfo"),
    ("RegionOfInterest", "sensor_msgs/msg/RegionOfInterest"),
    ("NavSatFix", "sensor_msgs/msg/NavSatFix"),
    ("NavSatStatus", "sensor_msgs/msg/NavSatStatus"),
    ("Point", "geometry_msgs/msg/Point"),
    ("Vector3", "geometry_msgs/msg/Vector3"),
    ("Quaternion", "geometry_msgs/msg/Quaternion"),
    ("Pose", "geometry_msgs/msg/Pose"),
    ("PoseWithCovariance", "geometry_msgs/msg/PoseWithCovariance"),
    ("Twist", "geometry_msgs/msg/Twist"),
    ("TwistWithCovariance", "geometry_msgs/msg/TwistWithCovariance"),
    ("TwistWithCovarianceStamped", "geometry_msgs/msg/TwistWithCovarianceStamped"),
    ("Transform", "geometry_msgs/msg/Transform"),
    ("TransformStamped", "geometry_msgs/msg/TransformStamped"),
    ("TFMessage", "tf2_msgs/msg/TFMessage"),
    ("Odometry", "nav_msgs/msg/Odometry"),
    ("MapMetaData", "nav_msgs/msg/MapMetaData"),
    ("OccupancyGrid", "nav_msgs/msg/OccupancyGrid"),
    ("Marker", "visualization_msgs/msg/Marker"),
    ("MarkerArray", "visualization_msgs/msg/MarkerArray"),
    ("DiagnosticArray", "diagnostic_msgs/msg/DiagnosticArray"),
    ("DiagnosticStatus", "diagnostic_msgs/msg/DiagnosticStatus"),
    ("KeyValue", "diagnostic_msgs/msg/KeyValue"),
    ("Clock", "rosgraph_msgs/msg/Clock"),
    ("ModalityStatus", "lmm_fusion/msg/ModalityStatus"),
    ("SceneAssessment", "lmm_fusion/msg/SceneAssessment"),
    ("ActionSuggestion", "lmm_fusion/msg/ActionSuggestion"),
)
#: Attribute name -> ROS type name (every message built looks its class up here, several per output).
_ROS_NAME: dict[str, str] = dict(_TYPES)


@dataclass(frozen=True)
class MsgTypes:
    """A namespace of message classes (attributes named as in ``_TYPES``) plus where they came from.

    ``kind`` is ``"rosbags"`` or ``"rclpy"``. ``by_name`` maps ROS type names to classes.
    """

    kind: str
    by_name: dict[str, Any]

    def __getattr__(self, attr: str) -> Any:
        ros_name = _ROS_NAME.get(attr)
        if ros_name is None:
            raise AttributeError(attr)
        try:
            return self.by_name[ros_name]
        except KeyError:
            raise AttributeError(f"{ros_name} is not available from {self.kind}") from None


def msg_definition_dir() -> Path:
    """Folder holding the package's ``msg/*.msg`` files (source tree first, then install)."""
    candidates = [
        Path(__file__).resolve().parents[2] / "msg",
        Path(sys.prefix) / "share" / "lmm_fusion" / "msg",
    ]
    try:  # a system ROS 2 install
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("lmm_fusion")) / "msg")
    except Exception:
        pass
    for c in candidates:
        if (c / "SceneAssessment.msg").is_file():
            return c
    raise FileNotFoundError(f"lmm_fusion .msg files not found in any of {[str(c) for c in candidates]}")


@functools.cache
def typestore() -> Any:
    """The rosbags typestore for ROS 2 Jazzy with the ``lmm_fusion`` messages registered from their .msg files.

    Each type is registered under its name ``lmm_fusion/msg/X`` and under ``lmm_fusion_msgs/msg/X``, the
    name of the separate interface package of earlier releases, with that package's definitions, so
    bags recorded with it still read.
    """
    store = get_typestore(Stores.ROS2_JAZZY)
    folder = msg_definition_dir()
    extra: dict[str, Any] = {}
    for path in sorted(folder.glob("*.msg")):
        text = path.read_text()
        extra.update(get_types_from_msg(text, f"lmm_fusion/msg/{path.stem}"))
        legacy = _LEGACY_DEFINITIONS.get(path.stem, text)
        extra.update(get_types_from_msg(legacy, f"{LEGACY_MSG_PACKAGE}/msg/{path.stem}"))
    store.register(extra)
    return store


@functools.cache
def rosbags_types() -> MsgTypes:
    """Message classes of the rosbags typestore (for writing and reading bags without ROS)."""
    store = typestore()
    return MsgTypes("rosbags", {ros: store.types[ros] for _, ros in _TYPES})


@functools.cache
def rclpy_types() -> MsgTypes:
    """Message classes of the installed ROS 2 Python packages (for publishing over DDS)."""
    classes: dict[str, Any] = {}
    for _, ros in _TYPES:
        pkg, _, name = ros.split("/")
        try:
            classes[ros] = getattr(importlib.import_module(f"{pkg}.msg"), name)
        except ImportError:  # e.g. tf2_msgs is not on PyPI; only the bag writer needs it
            continue
    return MsgTypes("rclpy", classes)


def ros_type_name(msg: Any) -> str:
    """'pkg/msg/Type' of a rosbags or rclpy message instance or class."""
    name = getattr(msg, "__msgtype__", None)
    if isinstance(name, str):
        return name
    cls = msg if isinstance(msg, type) else type(msg)
    pkg = cls.__module__.split(".")[0]
    return f"{pkg}/msg/{cls.__name__}"
