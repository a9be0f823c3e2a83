"""Synthetic full-size sensor payloads (ROS-free): a LiDAR scan, its 48-byte point layout, a camera frame.

Used by ``lmm-fusion bench`` (stage timings) and ``lmm-fusion load`` (the sensors it publishes), so both
measure the same data.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Fields and byte offsets of the padded 48-byte point layout that real spinning LiDARs publish.
PADDED_POINT_DTYPE = np.dtype(
    {
        "names": ["x", "y", "z", "intensity", "t", "reflectivity", "ring", "ambient", "range"],
        "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2", "<u2", "<u2", "<u4"],
        "offsets": [0, 4, 8, 16, 20, 24, 26, 28, 32],
        "itemsize": 48,
    }
)


def synthetic_points(n: int, seed: int = 0) -> np.ndarray:
    """(n, 4) float32 x, y, z, intensity of a plausible scan in the LiDAR frame: ground ring + boxes."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(2.0, 60.0, n)
    az = rng.uniform(-math.pi, math.pi, n)
    z = np.where(rng.random(n) < 0.7, -1.85 + rng.normal(0, 0.02, n), rng.uniform(-1.8, 1.0, n))
    return np.stack([r * np.cos(az), r * np.sin(az), z, rng.uniform(0, 1, n)], axis=1).astype(np.float32)


def padded_cloud_array(points: np.ndarray) -> np.ndarray:
    """(N,) structured array of :data:`PADDED_POINT_DTYPE` (extra fields, padding) holding ``points``
    ((N, 4) x, y, z, intensity); ``ring`` counts 0..63."""
    rec = np.zeros(len(points), PADDED_POINT_DTYPE)
    for k, name in enumerate(("x", "y", "z", "intensity")):
        rec[name] = points[:, k]
    rec["ring"] = np.arange(len(points)) % 64
    return rec


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB with smooth gradients and boxes (compresses like a camera frame, unlike noise)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    img = np.stack([120 + 80 * y + 0 * x, 140 + 60 * x * y, 160 - 90 * y + 0 * x], axis=2).astype(np.uint8)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(height // 3, height - 40))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 120))), color, -1)
    return img


__all__ = ["PADDED_POINT_DTYPE", "padded_cloud_array", "synthetic_image", "synthetic_points"]
