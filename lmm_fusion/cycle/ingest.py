"""Sensor messages in, :class:`~lmm_fusion.cycle.sync.SensorSync` frames out.

The one place where a received message (rclpy, rosbags or CARLA-wrapped) becomes a frame: the node's
subscription callbacks, offline replay, the training dataset and INT8 calibration all feed messages
through :class:`SensorIngest`, so they decode, validate and count bad input identically.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.cycle.extrinsics import Extrinsics
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.cycle.sync import SensorSync, Snapshot
from lmm_fusion.io import EgoMotionEstimator, MessageError, read_fix, read_image, read_odometry, read_points
from lmm_fusion.io.common import stamp_to_sec
from lmm_fusion.io.pointcloud import field_dtype

log = logging.getLogger(__name__)

#: ROS message type -> sensor (modality) name it feeds.
SENSOR_OF_MSGTYPE: dict[str, str] = {
    "sensor_msgs/msg/Image": "camera",
    "sensor_msgs/msg/CompressedImage": "camera",
    "sensor_msgs/msg/PointCloud2": "lidar",
    "sensor_msgs/msg/NavSatFix": "gnss",
    # Optional ego speed (not a modality: it replaces the GNSS estimate's speed while fresh).
    "nav_msgs/msg/Odometry": "odometry",
    "geometry_msgs/msg/TwistWithCovarianceStamped": "odometry",
}


def prefer_odometry_speed(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` with a fresh odometry speed (``frames["odometry"]``) in place of the GNSS estimate's
    (``frames["gnss"].speed``, when that state is valid); unchanged otherwise. The one rule for the model's
    ego input: the pipeline and the training dataset both apply it, so the model sees the same speed in
    training as on the vehicle."""
    odometry = snapshot.frames.get("odometry")
    state = snapshot.frames.get("gnss")
    if odometry is None or state is None or not bool(getattr(state, "valid", False)):
        return snapshot
    return replace(snapshot, frames={**snapshot.frames, "gnss": replace(state, speed=float(odometry.speed))})


@dataclass
class IngestStats:
    """Per-sensor counters (thread-safe updates go through :class:`SensorIngest`)."""

    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    last_error: dict[str, str] = field(default_factory=dict)


class SensorIngest:
    """Decode, validate and push sensor messages into a :class:`SensorSync`.

    ``on_message`` never raises for bad input: a :class:`MessageError` is logged, counted for that
    sensor and the message is dropped, so one broken sensor never stops the others. Each frame keeps its
    ``header.frame_id`` in the sync. ``extrinsics``: where :meth:`on_tf` puts ``/tf_static`` (share it with
    the :class:`~lmm_fusion.cycle.pipeline.FusionPipeline` that transforms the clouds); None ignores it.
    ``preprocessor``: the one that grids these clouds (``pipeline.preprocessor``), told each cloud's intensity
    datatype so the unit is detected from it (float counts are not a 16-bit range).
    """

    def __init__(self, sync: SensorSync, rig: SensorRig | None = None, extrinsics: Extrinsics | None = None,
                 preprocessor: Preprocessor | None = None) -> None:
        self.sync = sync
        self.rig = rig or SensorRig()
        self.extrinsics = extrinsics
        # Told each cloud's intensity datatype, which the decoded (N, 4) float32 frame no longer shows.
        self.preprocessor = preprocessor
        # No fixed geodetic origin: the estimator anchors its ENU frame at the first fix and moves it
        # with the vehicle, so speeds are right wherever the drive is.
        self._ego = EgoMotionEstimator()
        self._lock = threading.Lock()  # the GNSS estimator is stateful; callbacks may run in parallel
        self.stats = IngestStats()

    def decode(self, sensor: str, msg: Any) -> tuple[float, Any]:
        """Message -> (stamp [s], frame data) for ``sensor``; raises :class:`MessageError`.

        camera -> (H, W, 3) uint8 RGB; lidar -> (N, 4) float32 x, y, z, intensity in the LiDAR frame;
        gnss -> ``EgoState`` (ego motion estimated from the fix sequence); odometry ->
        :class:`~lmm_fusion.io.odometry.OdometrySpeed` (``nav_msgs/Odometry`` or ``TwistWithCovarianceStamped``).
        """
        header = getattr(msg, "header", None)
        if header is None or not hasattr(header, "stamp"):
            raise MessageError(f"{sensor}: message has no header.stamp")
        stamp = stamp_to_sec(header.stamp)
        if sensor == "camera":
            return stamp, read_image(msg)
        if sensor == "lidar":
            points = read_points(msg, ("x", "y", "z", "intensity"))
            if self.preprocessor is not None:
                self.preprocessor.note_intensity_dtype(field_dtype(msg, "intensity"))
            return stamp, points
        if sensor == "odometry":
            return stamp, read_odometry(msg)
        if sensor == "gnss":
            try:
                fix = read_fix(msg)
            except MessageError as exc:
                with self._lock:
                    self._ego.note_no_fix(str(exc))
                raise
            with self._lock:
                return stamp, self._ego.update(fix)
        raise MessageError(f"sensor: unknown sensor name {sensor!r}")

    @property
    def ego_reason(self) -> str:
        """Why there is no valid ego-motion estimate now ("" when there is): e.g. "no fix yet",
        "waiting for fixes (1 of 3)", "implausible jump rejected: ..." (``EgoMotionEstimator.reason``)."""
        with self._lock:
            return self._ego.reason

    def on_tf(self, msg: Any) -> int:
        """Feed one ``tf2_msgs/TFMessage`` of ``/tf_static`` into :attr:`extrinsics`; transforms taken (0 without)."""
        return 0 if self.extrinsics is None else self.extrinsics.update_tf(msg)

    #: The reason counted when the sync refuses a frame (it notes its own, more precise reason).
    SYNC_REFUSED = "rejected by sync (stamp out of order or in the future)"

    def count_rejected(self, sensor: str, why: str, was_accepted: bool = False, refused_by_sync: bool = False) -> None:
        """Count one refused message of ``sensor`` with its reason; ``was_accepted``: it had been counted as
        accepted (a frame decoded only when first used); ``refused_by_sync``: the sync refused it and has
        noted why itself, else the sync is told, so the snapshot's reason says it while no frame is usable."""
        with self._lock:
            if was_accepted:
                self.stats.accepted[sensor] -= 1
            self.stats.rejected[sensor] += 1
            self.stats.last_error[sensor] = why
        if not refused_by_sync:
            self.sync.note_rejected(sensor, why)
        log.debug("rejected %s message: %s", sensor, why)

    def count_accepted(self, sensor: str) -> None:
        """Count one message of ``sensor`` that reached the sync."""
        with self._lock:
            self.stats.accepted[sensor] += 1

    def on_message(self, sensor: str, msg: Any, now: float | None = None) -> bool:
        """Feed one message; True when it reached the sync buffer, False when rejected (counted)."""
        try:
            stamp, data = self.decode(sensor, msg)
        except MessageError as exc:
            self.count_rejected(sensor, str(exc))
            return False
        frame_id = getattr(msg.header, "frame_id", None)
        accepted = self.sync.update(sensor, stamp, data, now=now, frame_id=None if frame_id is None else str(frame_id))
        if accepted:
            self.count_accepted(sensor)
        else:
            self.count_rejected(sensor, self.SYNC_REFUSED, refused_by_sync=True)
        return accepted
