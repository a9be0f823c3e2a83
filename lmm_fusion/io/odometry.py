"""Ego speed from ``nav_msgs/Odometry`` or ``geometry_msgs/TwistWithCovarianceStamped`` (message -> numbers).

Vehicles measure their speed better than GNSS does (wheel odometry, a localisation stack's twist), so the
node takes it as an optional input. Only the twist is read: ``twist.twist.linear`` [m/s] and
``twist.twist.angular.z`` [rad/s], expressed in the Odometry's ``child_frame_id`` (the vehicle, REP-105) or
in the ``header.frame_id`` of a TwistWithCovarianceStamped. The speed is the horizontal magnitude
``hypot(vx, vy)``: independent of how that frame is turned on the vehicle, and for a frame elsewhere on
the rigid body different from ``base_link``'s only by ``yaw_rate x lever arm`` (< 0.3 m/s at 0.1 rad/s and
3 m), so no transform is needed. The sign of ``vx`` says whether the vehicle reverses.

Bad input raises :class:`~lmm_fusion.io.errors.MessageError` naming the field and value: a non-finite
velocity, a negative variance on the covariance diagonal, or a speed beyond :data:`MAX_SPEED`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.io.errors import MessageError

#: Speeds above this [m/s] (324 km/h) are not a road vehicle's: the message is rejected.
MAX_SPEED = 90.0
#: Yaw rates above this [rad/s] are rejected (a car turns at most ~1 rad/s).
MAX_YAW_RATE = 10.0


@dataclass(frozen=True)
class OdometrySpeed:
    """One speed measurement: ``stamp`` [s], ``speed`` [m/s] (>= 0, horizontal), ``forward`` [m/s] (signed
    ``vx``, negative when reversing), ``yaw_rate`` [rad/s], ``speed_std`` [m/s] (from the covariance; NaN
    when not stated, i.e. all zero), ``frame_id`` (the frame the twist is expressed in)."""

    stamp: float
    speed: float
    forward: float
    yaw_rate: float
    speed_std: float
    frame_id: str


def _covariance(twist_cov: Any, field: str) -> np.ndarray:
    """The 6x6 twist covariance (row-major float64[36]) as an array; raises MessageError when malformed."""
    cov = getattr(twist_cov, "covariance", None)
    if cov is None:
        return np.zeros((6, 6))
    try:
        arr = np.asarray(cov, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MessageError(f"{field}.covariance: not a float64[36] array") from None
    if arr.size != 36:
        raise MessageError(f"{field}.covariance: expected 36 values, got {arr.size}")
    return arr.reshape(6, 6)


def read_odometry(msg: Any) -> OdometrySpeed:
    """``nav_msgs/Odometry`` or ``geometry_msgs/TwistWithCovarianceStamped`` -> :class:`OdometrySpeed`.

    Duck-typed on field names (rclpy, rosbags). Raises :class:`MessageError` for a message without
    ``header.stamp`` or ``twist.twist``, a non-finite or absurd velocity, or a negative variance.
    """
    header = getattr(msg, "header", None)
    if header is None or not hasattr(header, "stamp"):
        raise MessageError("odometry: message has no header.stamp")
    outer = getattr(msg, "twist", None)
    inner = getattr(outer, "twist", None)
    linear, angular = getattr(inner, "linear", None), getattr(inner, "angular", None)
    if linear is None or angular is None:
        raise MessageError("odometry: message has no twist.twist.linear/angular (not Odometry or "
                           "TwistWithCovarianceStamped)")
    # Odometry's twist is in child_frame_id; a TwistWithCovarianceStamped's in its header frame.
    frame = getattr(msg, "child_frame_id", None)
    frame_id = str(frame) if frame is not None else str(getattr(header, "frame_id", ""))
    values = {}
    for name, obj, attr in (("linear.x", linear, "x"), ("linear.y", linear, "y"), ("angular.z", angular, "z")):
        try:
            v = float(getattr(obj, attr))
        except (TypeError, ValueError, AttributeError):
            raise MessageError(f"odometry: twist.twist.{name} is not a number") from None
        if not math.isfinite(v):
            raise MessageError(f"odometry: twist.twist.{name}={v!r} is not finite")
        values[name] = v
    vx, vy, wz = values["linear.x"], values["linear.y"], values["angular.z"]
    speed = math.hypot(vx, vy)
    if speed > MAX_SPEED:
        raise MessageError(f"odometry: speed {speed:.1f} m/s (twist.twist.linear x={vx:g}, y={vy:g}) is "
                           f"implausible (> {MAX_SPEED:g} m/s)")
    if abs(wz) > MAX_YAW_RATE:
        raise MessageError(f"odometry: twist.twist.angular.z={wz:g} rad/s is implausible (> {MAX_YAW_RATE:g})")
    cov = _covariance(outer, "twist")
    diag = np.diag(cov)
    if not np.all(np.isfinite(diag)):
        raise MessageError(f"odometry: twist.covariance diagonal {diag.tolist()} is not finite")
    if (diag < 0).any():
        i = int(np.flatnonzero(diag < 0)[0])
        raise MessageError(f"odometry: twist.covariance[{i * 7}]={diag[i]:g}: a variance cannot be negative")
    var = diag[0] + diag[1]
    speed_std = math.sqrt(var) if var > 0 else math.nan  # an all-zero covariance means "not stated"
    return OdometrySpeed(stamp=stamp_to_sec(header.stamp), speed=speed, forward=vx, yaw_rate=wz,
                         speed_std=speed_std, frame_id=frame_id)


def create_odometry(types: Any, header: Any, child_frame_id: str, vx: float, vy: float = 0.0,
                    yaw_rate: float = 0.0, speed_var: float = 0.0) -> Any:
    """``nav_msgs/Odometry`` of ``types`` with the given twist [m/s, rad/s] in ``child_frame_id`` and the pose
    left at the origin (only the twist is read here); ``speed_var`` [m^2/s^2] on the vx/vy diagonal."""
    cov = np.zeros(36, np.float64)
    cov[0] = cov[7] = speed_var
    pose_cov = np.zeros(36, np.float64)
    pose = types.PoseWithCovariance(
        pose=types.Pose(position=types.Point(x=0.0, y=0.0, z=0.0),
                        orientation=types.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=pose_cov if types.kind == "rosbags" else pose_cov.tolist())
    twist = types.TwistWithCovariance(
        twist=types.Twist(linear=types.Vector3(x=float(vx), y=float(vy), z=0.0),
                          angular=types.Vector3(x=0.0, y=0.0, z=float(yaw_rate))),
        covariance=cov if types.kind == "rosbags" else cov.tolist())
    return types.Odometry(header=header, child_frame_id=child_frame_id, pose=pose, twist=twist)


__all__ = ["MAX_SPEED", "MAX_YAW_RATE", "OdometrySpeed", "create_odometry", "read_odometry"]
