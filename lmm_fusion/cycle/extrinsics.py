"""Sensor frame -> ``base_link`` transforms, looked up by each message's own ``header.frame_id``.

:class:`Extrinsics` answers "which 4x4 transform takes points in frame F to ``base_link``" for the
frames a cycle meets. Precedence, per frame of the chain from F up to ``base_link``:

1. ``/tf_static`` (``tf2_msgs/TFMessage``, fed with :meth:`Extrinsics.update_tf`): parent -> child
   edges, composed along a chain (``base_link -> sensor_kit -> lidar``);
2. per-sensor extrinsics given by the caller (:meth:`Extrinsics.set`, e.g. from parameters), each a
   frame -> ``base_link`` transform;
3. the rig's own mounts (``lmm_fusion.io.tf.rig_transforms``: the project's synthetic ``lidar``,
   ``camera_optical`` and ``gnss`` frames), only when ``rig_fallback`` is True.

``base_link`` itself is the identity: a cloud already in ``base_link`` (Autoware's concatenated
cloud) is used as it is. There is no silent default: a frame with none of these gives
:class:`ExtrinsicsError` ("no transform from 'os_lidar' to base_link"). ROS-free and thread-safe
(a live node feeds ``/tf_static`` from a callback while the cycle thread looks frames up).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from lmm_fusion.base import topics
from lmm_fusion.base.rig import SensorRig, transform_points
from lmm_fusion.io.tf import rig_transforms

#: Longest parent chain followed before a cycle in ``/tf_static`` is reported.
MAX_CHAIN = 32


class ExtrinsicsError(LookupError):
    """A frame with no known transform to ``base_link`` (the message says which and why)."""


def matrix_from_transform(transform: Any) -> np.ndarray:
    """``geometry_msgs/Transform`` (translation + unit quaternion x, y, z, w) -> 4x4 float64 matrix.

    Raises :class:`ExtrinsicsError` for non-finite values or a zero quaternion.
    """
    t, q = transform.translation, transform.rotation
    tx, ty, tz = float(t.x), float(t.y), float(t.z)
    x, y, z, w = float(q.x), float(q.y), float(q.z), float(q.w)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    if not all(math.isfinite(v) for v in (tx, ty, tz, x, y, z, w)) or n < 1e-9:
        raise ExtrinsicsError(f"transform: non-finite translation or invalid quaternion ({x}, {y}, {z}, {w})")
    x, y, z, w = x / n, y / n, z / n, w / n
    m = np.eye(4)
    m[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                 [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                 [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    m[:3, 3] = (tx, ty, tz)
    return m


class Extrinsics:
    """Transforms from sensor frame ids to ``base_link`` (see the module docstring for the precedence).

    ``rig`` gives the fallback mounts, used only with ``rig_fallback=True``; ``params`` maps frame id ->
    4x4 frame -> ``base_link`` transform given by the caller.
    """

    def __init__(self, rig: SensorRig | None = None, *, rig_fallback: bool = False,
                 params: dict[str, np.ndarray] | None = None) -> None:
        self.rig_fallback = rig_fallback
        self._rig = dict(rig_transforms(rig or SensorRig()))
        self._lock = threading.Lock()
        self._tf: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, child -> parent)
        self._params: dict[str, np.ndarray] = {}
        self._cache: dict[str, np.ndarray] = {}
        for frame, m in (params or {}).items():
            self.set(frame, m)

    def set(self, frame_id: str, to_base: np.ndarray) -> None:
        """Caller-given extrinsics: ``to_base`` (4, 4) takes points in ``frame_id`` to ``base_link``."""
        m = np.asarray(to_base, np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise ValueError(f"extrinsics[{frame_id!r}]: need a finite 4x4 matrix, got shape {m.shape}")
        with self._lock:
            self._params[frame_id.lstrip("/")] = m
            self._cache.clear()

    def update_tf(self, msg: Any) -> int:
        """Add the transforms of one ``tf2_msgs/TFMessage`` (``/tf_static``); returns how many were taken.

        A newer transform of a child frame replaces the older one; a malformed entry is skipped.
        """
        taken: dict[str, tuple[str, np.ndarray]] = {}
        for ts in getattr(msg, "transforms", None) or []:
            parent = str(ts.header.frame_id).lstrip("/")
            child = str(ts.child_frame_id).lstrip("/")
            if not parent or not child or parent == child:
                continue
            try:
                taken[child] = (parent, matrix_from_transform(ts.transform))
            except (ExtrinsicsError, AttributeError, TypeError, ValueError):
                continue
        if taken:
            with self._lock:
                self._tf.update(taken)
                self._cache.clear()
        return len(taken)

    @property
    def tf_frames(self) -> list[str]:
        """Child frames known from ``/tf_static``."""
        with self._lock:
            return sorted(self._tf)

    def lookup(self, frame_id: str | None) -> np.ndarray:
        """4x4 float64 transform ``frame_id`` -> ``base_link``; raises :class:`ExtrinsicsError` naming the frame."""
        if not frame_id:
            raise ExtrinsicsError(f"no transform to {topics.BASE_FRAME}: the message has an empty header.frame_id")
        frame = frame_id.lstrip("/")
        with self._lock:
            hit = self._cache.get(frame)
            if hit is not None:
                return hit
            m = self._resolve(frame)
            self._cache[frame] = m
            return m

    def _resolve(self, frame: str) -> np.ndarray:
        acc = np.eye(4)
        cur = frame
        for _ in range(MAX_CHAIN):
            if cur == topics.BASE_FRAME:
                return acc
            edge = self._tf.get(cur)
            if edge is not None:
                parent, m = edge
                acc = m @ acc
                cur = parent
                continue
            direct = self._params.get(cur)
            if direct is None and self.rig_fallback:
                direct = self._rig.get(cur)
            if direct is not None:
                return direct @ acc
            via = "" if cur == frame else f" (its chain stops at {cur!r})"
            raise ExtrinsicsError(f"no transform from {frame!r} to {topics.BASE_FRAME}{via}")
        raise ExtrinsicsError(f"no transform from {frame!r} to {topics.BASE_FRAME}: /tf_static has a loop")

    def to_base(self, points: Any, frame_id: str | None) -> np.ndarray:
        """``(N, >=3)`` points in ``frame_id`` -> ``(N, 3)`` float32 xyz in ``base_link`` [m].

        ``base_link`` points are returned as they are (no arithmetic). Raises :class:`ExtrinsicsError`.
        """
        pts = np.asarray(points, np.float32)
        if (frame_id or "").lstrip("/") == topics.BASE_FRAME:
            return np.ascontiguousarray(pts[:, :3])
        return transform_points(self.lookup(frame_id).astype(np.float32), pts)


__all__ = ["MAX_CHAIN", "Extrinsics", "ExtrinsicsError", "matrix_from_transform"]
