"""Rendering: panel sizes and content, masked inputs, video + key frames, timeline plot."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.vocabulary import Action, Risk
from lmm_fusion.cycle.assessment import Assessment, invalid, modality_states
from lmm_fusion.groundtruth.messages import GroundTruth
from lmm_fusion.offline.render import (
    CAMERA_WIDTH,
    PANEL_HEIGHT,
    CycleRecord,
    VideoRenderer,
    bev_panel,
    camera_panel,
    compose_frame,
    timeline_plot,
)

AGES = {"camera": 0.01, "lidar": 0.02, "gnss": 0.05}


def sample(
    mask: tuple[bool, bool, bool] = (True, True, True), occupied: tuple[int, int] | None = None
) -> Assessment:
    occ = np.zeros(OCCUPANCY_GRID.shape, np.float32)
    if occupied is not None:
        occ[occupied] = 1.0
    return Assessment(
        stamp=5.0,
        valid=True,
        modalities=modality_states(np.array(mask), AGES, np.array([0.5, 0.3, 0.2])),
        risk=Risk.HIGH,
        risk_probs=np.array([0.1, 0.2, 0.7], np.float32),
        ttc=2.0,
        distance=12.0,
        action=Action.SLOW_DOWN,
        target_speed=4.0,
        confidence=0.6,
        rationale="slow down: obstacle",
        occupancy=occ,
        ego_speed=9.0,
    )


def test_camera_panel_size_and_aspect() -> None:
    rgb = np.full((180, 320, 3), 128, np.uint8)
    img = camera_panel(rgb, sample())
    assert img.shape == (PANEL_HEIGHT, CAMERA_WIDTH, 3) and img.dtype == np.uint8
    # A 4:3 image is letter-boxed, not stretched: black bars at the sides (below the overlays' boxes).
    boxed = camera_panel(np.full((480, 640, 3), 200, np.uint8), sample())
    assert boxed.shape == (PANEL_HEIGHT, CAMERA_WIDTH, 3)
    assert boxed[PANEL_HEIGHT // 2, 5].max() == 0 and boxed[PANEL_HEIGHT // 2, CAMERA_WIDTH // 2].min() > 150


def test_camera_panel_draws_risk_colour_and_masked_camera() -> None:
    img = camera_panel(None, sample(mask=(False, True, True)), GroundTruth(stamp=5.0, action=Action.STOP))
    assert img.shape == (PANEL_HEIGHT, CAMERA_WIDTH, 3)
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red[:60].sum() > 100  # "RISK HIGH" and the high segment of the bar
    inv = camera_panel(None, invalid(5.0, np.zeros(3, bool), AGES))
    assert inv.shape == img.shape


def test_bev_panel_points_occupancy_and_truth() -> None:
    a = sample(occupied=(16, 30))  # y = 0.5 m, x = 22.5 m
    gt = np.zeros(OCCUPANCY_GRID.shape, np.float32)
    gt[16, 40] = 1.0
    pts = np.array([[30.0, 0.0, 1.0], [30.0, 5.0, 0.0]], np.float32)
    img = bev_panel(pts, a, gt)
    assert img.shape == (PANEL_HEIGHT, PANEL_HEIGHT // 2, 3)
    scale = PANEL_HEIGHT / 64.0
    row, col = int((56 - 22.5) * scale), int((16 - 0.5) * scale)
    assert img[row, col, 0] > 150 and img[row, col, 1] < 80  # predicted cell drawn red
    row_pt, col_pt = int((56 - 30.0) * scale), int((16 - 0.0) * scale)
    assert img[row_pt, col_pt].min() > 200  # an obstacle return in white
    green = (img[..., 1] > 200) & (img[..., 0] < 100)
    assert green[int((56 - 33) * scale) : int((56 - 31) * scale) + 1].any()  # truth outline around x = 32.5 m
    masked = bev_panel(None, a, None)
    assert masked.shape == img.shape


def test_compose_and_video_with_keyframes(tmp_path: Path) -> None:
    rgb = np.full((180, 320, 3), 90, np.uint8)
    r = VideoRenderer(tmp_path, fps=10.0, keyframe_every_s=0.5)
    for i in range(12):
        r.add(compose_frame(rgb, None, sample(), None, t=i * 0.1), t=100.0 + i * 0.1)
    with pytest.raises(ValueError, match="frame size"):
        r.add(np.zeros((10, 10, 3), np.uint8), 101.3)
    r.close()
    cap = cv2.VideoCapture(str(r.video_path))
    frames = []
    ok, f = cap.read()
    while ok:
        frames.append(f)
        ok, f = cap.read()
    cap.release()
    assert len(frames) == 12 and frames[0].shape == (PANEL_HEIGHT, CAMERA_WIDTH + PANEL_HEIGHT // 2, 3)
    assert [p.name for p in r.keyframes] == ["frame_0000.00s.png", "frame_0000.50s.png", "frame_0001.00s.png"]
    assert cv2.imread(str(r.keyframes[1])).shape == frames[0].shape


def test_timeline_plot(tmp_path: Path) -> None:
    recs = [
        CycleRecord(
            t=10.0 + 0.1 * i,
            valid=True,
            degraded=i > 20,
            risk=i % 3,
            action=i % 6,
            target_speed=float(i % 7),
            ego_speed=None if i < 3 else 5.0,
            attention=(0.5, 0.3, 0.2),
            override=i % 5 == 0,
            gt_risk=1,
            gt_action=2,
            gt_target_speed=4.0,
            gt_ego_speed=5.1,
        )
        for i in range(40)
    ]
    path = timeline_plot(recs, tmp_path / "t.png", title="test")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[:2] == (900, 1300)
    with pytest.raises(ValueError, match="no cycles"):
        timeline_plot([], tmp_path / "empty.png")
