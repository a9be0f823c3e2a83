"""Pictures of what the fusion pipeline concluded: camera overlays, a bird's-eye panel, video, timeline.

All images are ``(H, W, 3)`` uint8 **RGB** arrays (converted to BGR only where OpenCV writes files).

* :func:`camera_panel`: the camera image (letter-boxed to a fixed size) with the risk bar, action and
  target speed, per-modality attention bars, the rationale and, when present, the ground truth.
* :func:`bev_panel`: top view of ``base_link`` on :data:`~lmm_fusion.base.grid.OCCUPANCY_GRID`, x forward
  pointing up, y left pointing left: LiDAR points, predicted occupancy (red), ground-truth occupancy
  (green outlines), the ego vehicle and the suggested path.
* :func:`compose_frame`: both side by side; :class:`VideoRenderer` writes them to an MP4 (``mp4v``)
  plus key-frame PNGs.
* :func:`timeline_plot`: risk, action, target and ego speed, attention over bag time against ground
  truth (matplotlib, Agg backend).
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib
import numpy as np

from lmm_fusion.base.grid import OCCUPANCY_GRID, BevGrid
from lmm_fusion.base.rig import DEFAULT_VEHICLE, VehicleGeometry
from lmm_fusion.base.vocabulary import MODALITIES, Action, Risk
from lmm_fusion.cycle.assessment import Assessment
from lmm_fusion.groundtruth.messages import GroundTruth
from lmm_fusion.ros.outputs import _path_points

# Plots go to files only (no display on a vehicle or in CI); the backend is chosen before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

#: Panel height [px] of every rendered frame; the camera panel is 16:9 at this height.
PANEL_HEIGHT = 480
CAMERA_WIDTH = 854
#: Height of the shaded legend header of the BEV panel [px].
HEADER_PX = 40
FONT = cv2.FONT_HERSHEY_SIMPLEX

#: RGB colours (0..255).
RISK_RGB: dict[Risk, tuple[int, int, int]] = {
    Risk.LOW: (40, 200, 60),
    Risk.MEDIUM: (255, 180, 0),
    Risk.HIGH: (230, 30, 30),
}
WHITE, GREY, BLACK = (255, 255, 255), (140, 140, 140), (0, 0, 0)
CYAN, GREEN, RED = (0, 200, 255), (60, 230, 90), (255, 60, 50)
MODALITY_RGB: dict[str, tuple[int, int, int]] = {
    "camera": (255, 160, 60),
    "lidar": (80, 170, 255),
    "gnss": (200, 120, 255),
}


def _text(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float = 0.6,
    colour: tuple[int, int, int] = WHITE,
    thickness: int = 1,
) -> None:
    """Text with a 1 px drop shadow, readable on any background. ``org`` is the baseline-left corner.

    (The shadow has the text's own thickness: a thicker outline changes glyph spacing in OpenCV 5.)"""
    cv2.putText(img, text, (org[0] + 1, org[1] + 1), FONT, scale, BLACK, thickness, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, scale, colour, thickness, cv2.LINE_AA)


def _shade(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, alpha: float = 0.55) -> None:
    """Darken a rectangle in place (backdrop for text)."""
    h, w = img.shape[:2]
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x1 > x0 and y1 > y0:
        img[y0:y1, x0:x1] = (img[y0:y1, x0:x1].astype(np.float32) * (1.0 - alpha)).astype(np.uint8)


def _letterbox(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fit ``rgb`` (H, W, 3) into a (height, width, 3) black canvas keeping its aspect ratio."""
    h, w = rgb.shape[:2]
    s = min(width / w, height / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    out = np.zeros((height, width, 3), np.uint8)
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = small
    return out


def _fmt(x: float, unit: str) -> str:
    return f"{x:.1f} {unit}" if math.isfinite(x) else "none"


def camera_panel(
    rgb: np.ndarray | None,
    a: Assessment,
    gt: GroundTruth | None = None,
    t: float | None = None,
    width: int = CAMERA_WIDTH,
    height: int = PANEL_HEIGHT,
) -> np.ndarray:
    """Camera image with the assessment drawn on it -> (height, width, 3) uint8 RGB.

    ``rgb`` None (camera masked) gives a grey placeholder. ``t`` [s] is printed when given.
    """
    img = _letterbox(rgb, width, height) if rgb is not None else np.full((height, width, 3), 60, np.uint8)
    if rgb is None:
        _text(img, "camera masked", (width // 2 - 110, height // 2), 0.9, GREY, 2)
    colour = RISK_RGB[a.risk] if a.valid else GREY

    # Top-left: risk level and its probabilities as a three-segment bar (low | medium | high).
    _shade(img, 0, 0, 300, 92)
    _text(img, f"RISK {a.risk.name}" if a.valid else "NO ASSESSMENT", (10, 28), 0.8, colour, 2)
    x = 10
    for r in Risk:
        seg = round(280 * float(a.risk_probs[r])) if a.valid else 0
        cv2.rectangle(img, (x, 38), (x + seg, 54), RISK_RGB[r], -1)
        x += seg
    cv2.rectangle(img, (10, 38), (290, 54), WHITE, 1)
    _text(img, f"TTC {_fmt(a.ttc, 's')}   dist {_fmt(a.distance, 'm')}", (10, 78), 0.5)

    # Top-right: action and target speed (the guarded suggestion), confidence, light.
    _shade(img, width - 330, 0, width, 92)
    action = a.action.name.replace("_", " ")
    _text(img, f"{action}", (width - 320, 30), 0.8, colour, 2)
    _text(
        img,
        f"{a.target_speed:4.1f} m/s" + ("  [guard]" if a.safety_override else ""),
        (width - 320, 58),
        0.65,
        WHITE,
        2,
    )
    ego = f"ego {a.ego_speed:.1f} m/s" if a.ego_speed is not None else "ego ?"
    _text(img, f"conf {a.confidence:.2f}  light {a.light.name.lower()}  {ego}", (width - 320, 82), 0.45)

    # Left, below the risk box: per-modality attention shares (grey "masked" when not used).
    _shade(img, 0, 96, 230, 96 + 26 * len(MODALITIES) + 8)
    for i, m in enumerate(a.modalities):
        y = 96 + 22 + 26 * i
        _text(img, m.name, (10, y), 0.5, WHITE if m.used else GREY)
        cv2.rectangle(img, (80, y - 13), (220, y + 1), GREY, 1)
        if m.used:
            cv2.rectangle(img, (80, y - 13), (80 + round(140 * m.attention), y + 1), MODALITY_RGB[m.name], -1)
            _text(img, f"{m.attention:.2f}", (185, y - 1), 0.4)
        else:
            _text(img, "masked", (120, y - 1), 0.45, GREY)

    # Bottom: rationale (wrapped) and the ground truth when the bag has it.
    lines = textwrap.wrap(a.rationale, width=100)[:2]
    if gt is not None and gt.action is not None:
        speed = f" {gt.target_speed:.1f} m/s" if gt.target_speed is not None else ""
        risk = gt.risk.name if gt.risk is not None else "?"
        scen = f" [{gt.scenario}]" if gt.scenario else ""
        lines.append(f"truth: {gt.action.name.replace('_', ' ')}{speed}, risk {risk}{scen}")
    y0 = height - 10 - 22 * len(lines)
    _shade(img, 0, y0 - 6, width, height)
    for i, line in enumerate(lines):
        is_gt = gt is not None and i == len(lines) - 1 and line.startswith("truth:")
        _text(img, line, (10, y0 + 16 + 22 * i), 0.55, GREEN if is_gt else WHITE)
    if t is not None:
        _text(img, f"t = {t:7.2f} s", (width - 140, y0 - 12), 0.5)
    return img


def _to_px(x: np.ndarray, y: np.ndarray, grid: BevGrid, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """base_link (x, y) [m] -> panel (column, row) [px]: x up, y to the left."""
    col = (grid.y_max - np.asarray(y, np.float64)) * scale
    row = (grid.x_max - np.asarray(x, np.float64)) * scale
    return col, row


def _grid_image(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(ny, nx) grid (row +y, column +x) -> panel-oriented image of ``size`` (w, h), nearest cells."""
    turned = np.ascontiguousarray(values.T[::-1, ::-1])  # rows: -x, columns: -y
    return cv2.resize(turned.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)


def bev_panel(
    points_base: np.ndarray | None,
    a: Assessment,
    gt_occupancy: np.ndarray | None = None,
    height: int = PANEL_HEIGHT,
    grid: BevGrid = OCCUPANCY_GRID,
    vehicle: VehicleGeometry = DEFAULT_VEHICLE,
) -> np.ndarray:
    """Top view -> (height, width, 3) uint8 RGB, width = height × (y extent / x extent); the ego box is
    ``vehicle``'s footprint.

    ``points_base``: (N, >=3) LiDAR points in ``base_link`` [m] or None (LiDAR masked); points below
    0.3 m are drawn dim (ground). ``gt_occupancy``: (ny, nx) in [0, 1] on ``grid`` or None.
    """
    scale = height / (grid.x_max - grid.x_min)  # px per metre
    width = round((grid.y_max - grid.y_min) * scale)
    width += width % 2
    img = np.full((height, width, 3), 28, np.uint8)
    # Range rings every 10 m ahead of base_link (labelled), lane lines of a 3.5 m lane grid.
    for xm in range(10, int(grid.x_max) + 1, 10):
        _, r = _to_px(np.array([xm]), np.array([0.0]), grid, scale)
        cv2.line(img, (0, int(r[0])), (width, int(r[0])), (55, 55, 55), 1)
        if r[0] > HEADER_PX + 12:  # a label under the legend header would collide with it
            _text(img, f"{xm} m", (4, int(r[0]) - 3), 0.38, GREY)
    for ym in (-5.25, -1.75, 1.75, 5.25):
        c, _ = _to_px(np.array([0.0]), np.array([ym]), grid, scale)
        cv2.line(img, (int(c[0]), 0), (int(c[0]), height), (50, 50, 50), 1)
    if a.valid and a.occupancy is not None and a.occupancy.shape == grid.shape:
        # Squared: confident cells stand out, a 0.5 haze stays faint.
        p = np.clip(_grid_image(a.occupancy, (width, height)), 0.0, 1.0)[..., None] ** 2 * 0.85
        img = (img * (1.0 - p) + np.asarray(RED, np.float32) * p).astype(np.uint8)
    if points_base is not None and len(points_base):
        pts = np.asarray(points_base, np.float32)
        col, row = _to_px(pts[:, 0], pts[:, 1], grid, scale)
        ci, ri = col.astype(np.int64), row.astype(np.int64)
        inside = (ci >= 0) & (ci < width) & (ri >= 0) & (ri < height)
        high = pts[:, 2] > 0.3
        img[ri[inside & ~high], ci[inside & ~high]] = (90, 90, 90)
        # Obstacle returns as 2x2 px dots: a sparse LiDAR stays visible at this scale.
        hr, hc = ri[inside & high], ci[inside & high]
        for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
            img[np.minimum(hr + dr, height - 1), np.minimum(hc + dc, width - 1)] = (235, 235, 235)
    if gt_occupancy is not None and gt_occupancy.shape == grid.shape:
        mask = (_grid_image(gt_occupancy, (width, height)) >= 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, GREEN, 2)
    # Ego vehicle (base_link at the rear axle; the box spans back from the front bumper).
    c0, r0 = _to_px(np.array([vehicle.front_offset]), np.array([vehicle.width / 2]), grid, scale)
    c1, r1 = _to_px(np.array([vehicle.rear_offset]), np.array([-vehicle.width / 2]), grid, scale)
    cv2.rectangle(img, (int(c0[0]), int(r0[0])), (int(c1[0]), int(r1[0])), CYAN, -1)
    if a.valid:
        path = np.asarray(_path_points(a, vehicle), np.float64)  # the same path the RViz markers show
        pc, pr = _to_px(path[:, 0], path[:, 1], grid, scale)
        colour = RISK_RGB[a.risk]
        cv2.arrowedLine(
            img, (int(pc[0]), int(pr[0])), (int(pc[-1]), int(pr[-1])), colour, 3, cv2.LINE_AA, tipLength=0.15
        )
    _shade(img, 0, 0, width, HEADER_PX, alpha=0.85)  # the legend stays readable over a red haze
    _text(img, "BEV (base_link)", (6, 16), 0.45)
    _text(img, "pred occ", (6, 34), 0.42, RED)
    _text(img, "truth", (82, 34), 0.42, GREEN)
    _text(img, "lidar", (138, 34), 0.42, (235, 235, 235))
    if points_base is None:
        _text(img, "lidar masked", (width // 2 - 55, height - 14), 0.5, GREY)
    return img


def compose_frame(
    rgb: np.ndarray | None,
    points_base: np.ndarray | None,
    a: Assessment,
    gt: GroundTruth | None = None,
    t: float | None = None,
    vehicle: VehicleGeometry = DEFAULT_VEHICLE,
) -> np.ndarray:
    """Camera panel and BEV panel side by side -> (PANEL_HEIGHT, W, 3) uint8 RGB (W even)."""
    occ = gt.occupancy if gt is not None else None
    return np.concatenate([camera_panel(rgb, a, gt, t), bev_panel(points_base, a, occ, vehicle=vehicle)], axis=1)


class VideoRenderer:
    """Append composed frames to ``out_dir/replay.mp4`` (mp4v at ``fps``) and save a PNG key frame
    every ``keyframe_every_s`` seconds of bag time under ``out_dir/keyframes/``."""

    def __init__(self, out_dir: Path | str, fps: float, keyframe_every_s: float = 5.0) -> None:
        if not fps > 0:
            raise ValueError(f"fps: must be > 0, got {fps}")
        self.out_dir = Path(out_dir)
        self.video_path = self.out_dir / "replay.mp4"
        self.keyframe_dir = self.out_dir / "keyframes"
        self.keyframe_dir.mkdir(parents=True, exist_ok=True)
        for old in self.keyframe_dir.glob("frame_*s.png"):  # a rerun into the same folder starts clean
            old.unlink()
        self.fps = float(fps)
        self.keyframe_every_s = keyframe_every_s
        self.keyframes: list[Path] = []
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._t0: float | None = None
        self._next_key = 0.0

    def add(self, frame_rgb: np.ndarray, t: float) -> None:
        """Write one (H, W, 3) uint8 RGB frame at bag time ``t`` [s]; all frames have the first one's size."""
        h, w = frame_rgb.shape[:2]
        if self._writer is None:
            self._size = (w, h)
            self._writer = cv2.VideoWriter(
                str(self.video_path), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, (w, h)
            )
            if not self._writer.isOpened():
                raise RuntimeError(f"cv2.VideoWriter could not open {self.video_path} (mp4v, {w}x{h})")
            self._t0 = t
        elif (w, h) != self._size:
            raise ValueError(f"frame size {w}x{h} differs from the video's {self._size}")
        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        self._writer.write(bgr)
        self.frames += 1
        rel = t - (self._t0 or 0.0)
        if rel >= self._next_key - 0.5 / self.fps:  # half a frame: bag times accumulate rounding
            path = self.keyframe_dir / f"frame_{rel:07.2f}s.png"
            cv2.imwrite(str(path), bgr)
            self.keyframes.append(path)
            self._next_key += self.keyframe_every_s
            while self._next_key <= rel:
                self._next_key += self.keyframe_every_s

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


@dataclass(frozen=True)
class CycleRecord:
    """What the timeline plots of one cycle: bag time [s], prediction, and truth (None without it)."""

    t: float
    valid: bool
    degraded: bool
    risk: int
    action: int
    target_speed: float
    ego_speed: float | None
    attention: tuple[float, ...]
    override: bool
    gt_risk: int | None = None
    gt_action: int | None = None
    gt_target_speed: float | None = None
    gt_ego_speed: float | None = None


def _series(records: Sequence[CycleRecord], name: str) -> np.ndarray:
    return np.array([np.nan if getattr(r, name) is None else float(getattr(r, name)) for r in records])


def timeline_plot(records: Sequence[CycleRecord], path: Path | str, title: str = "") -> Path:
    """Risk, action, speeds and attention over bag time (relative to the first cycle) -> PNG at ``path``.

    Prediction solid, ground truth dashed; cycles with a masked modality are shaded grey and safety
    overrides marked on the action row.
    """
    path = Path(path)
    if not records:
        raise ValueError("timeline_plot: no cycles to plot")
    t = np.array([r.t for r in records]) - records[0].t
    fig, axes = plt.subplots(
        4, 1, figsize=(13, 9), sharex=True, gridspec_kw={"height_ratios": [1, 1.4, 1.6, 1]}
    )
    ax_risk, ax_action, ax_speed, ax_att = axes
    degraded = np.array([r.degraded or not r.valid for r in records])
    for ax in axes:
        if degraded.any():
            ax.fill_between(
                t,
                0,
                1,
                where=degraded,
                transform=ax.get_xaxis_transform(),
                color="0.85",
                step="mid",
                label="degraded" if ax is ax_risk else None,
            )
        ax.grid(True, alpha=0.3)

    ax_risk.step(t, _series(records, "risk"), where="post", color="tab:red", lw=1.8, label="predicted")
    if any(r.gt_risk is not None for r in records):
        ax_risk.step(t, _series(records, "gt_risk"), where="post", color="k", ls="--", lw=1.2, label="truth")
    ax_risk.set_yticks([int(r) for r in Risk], [r.name.lower() for r in Risk])
    ax_risk.set_ylim(-0.3, 2.3)
    ax_risk.set_ylabel("risk")
    ax_risk.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)

    ax_action.step(t, _series(records, "action"), where="post", color="tab:blue", lw=1.8, label="suggested")
    if any(r.gt_action is not None for r in records):
        ax_action.step(
            t, _series(records, "gt_action"), where="post", color="k", ls="--", lw=1.2, label="truth"
        )
    ov = np.array([r.override for r in records])
    if ov.any():
        # A rug below the classes: marking every overridden cycle on its line would hide the line.
        ax_action.plot(
            t[ov], np.full(int(ov.sum()), -0.55), "|", color="tab:orange", ms=7, label="guard override"
        )
    ax_action.set_yticks(
        [int(a) for a in Action], [a.name.lower().replace("_", " ") for a in Action], fontsize=8
    )
    ax_action.set_ylim(-0.8, len(Action) - 0.4)
    ax_action.set_ylabel("action")
    ax_action.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)

    ax_speed.plot(t, _series(records, "target_speed"), color="tab:blue", lw=1.8, label="target (suggested)")
    if any(r.gt_target_speed is not None for r in records):
        ax_speed.plot(
            t, _series(records, "gt_target_speed"), color="k", ls="--", lw=1.2, label="target (truth)"
        )
    ax_speed.plot(t, _series(records, "ego_speed"), color="tab:green", lw=1.4, label="ego (GNSS estimate)")
    if any(r.gt_ego_speed is not None for r in records):
        ax_speed.plot(
            t, _series(records, "gt_ego_speed"), color="tab:green", ls=":", lw=1.4, label="ego (truth)"
        )
    ax_speed.set_ylabel("speed [m/s]")
    ax_speed.set_ylim(bottom=0)
    ax_speed.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)

    att = np.array([r.attention for r in records], dtype=np.float64).reshape(len(records), len(MODALITIES))
    ax_att.stackplot(
        t,
        att.T,
        labels=list(MODALITIES),
        colors=[np.asarray(MODALITY_RGB[m]) / 255.0 for m in MODALITIES],
        alpha=0.85,
    )
    ax_att.set_ylim(0, 1)
    ax_att.set_ylabel("attention")
    ax_att.set_xlabel("bag time since first cycle [s]")
    ax_att.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "CAMERA_WIDTH",
    "PANEL_HEIGHT",
    "CycleRecord",
    "VideoRenderer",
    "bev_panel",
    "camera_panel",
    "compose_frame",
    "timeline_plot",
]
