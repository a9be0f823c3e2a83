"""``lmm-fusion contact-sheet``: one PNG showing the synthetic world, so a person can look at it.

One tile per scenario family: the camera frame (with the expert's label written on it) and, beside
it, a bird's-eye view of the LiDAR points in base_link (x up the tile, y to the left, coloured by
intensity) with the ego outline, the ego-lane corridor and the ground-truth occupancy cells.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.base.rig import DEFAULT_VEHICLE, SensorRig, VehicleGeometry
from lmm_fusion.base.vocabulary import Scenario
from lmm_fusion.groundtruth.expert import occupancy
from lmm_fusion.synth.camera import CameraRenderer
from lmm_fusion.synth.lidar import LidarSimulator
from lmm_fusion.synth.world import Scene, World

log = logging.getLogger(__name__)

#: BEV window in base_link [m] and scale [px/m].
BEV_X = (-10.0, 62.0)
BEV_Y = (-20.0, 20.0)
BEV_SCALE = 5.0


def bev_image(scene: Scene, points_base: np.ndarray, intensity: np.ndarray, height_px: int,
              vehicle: VehicleGeometry = DEFAULT_VEHICLE) -> np.ndarray:
    """(height_px, W, 3) uint8 RGB bird's-eye view: +x up, +y left; the ego outline is ``vehicle``."""
    scale = height_px / (BEV_X[1] - BEV_X[0])
    w = round((BEV_Y[1] - BEV_Y[0]) * scale)
    img = np.full((height_px, w, 3), 18, np.uint8)

    def px(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ((BEV_Y[1] - y) * scale).astype(int), ((BEV_X[1] - x) * scale).astype(int)

    # ground-truth occupancy cells (dim blue)
    b = scene.boxes
    ground = (b.center[:, 2] - b.size[:, 2] / 2) < 2.0
    occ = occupancy(b.center[ground, :2], b.yaw[ground], b.size[ground, :2])
    g = OCCUPANCY_GRID
    for iy, ix in zip(*np.nonzero(occ)):
        x0, y0 = g.x_min + ix * g.cell, g.y_min + iy * g.cell
        u0, v0 = px(np.array(x0 + g.cell), np.array(y0 + g.cell))
        u1, v1 = px(np.array(x0), np.array(y0))
        cv2.rectangle(img, (int(u0), int(v0)), (int(u1), int(v1)), (30, 40, 95), -1)
    # points coloured by intensity (turbo)
    x, y = points_base[:, 0], points_base[:, 1]
    keep = (x > BEV_X[0]) & (x < BEV_X[1]) & (y > BEV_Y[0]) & (y < BEV_Y[1])
    u, v = px(x[keep], y[keep])
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]
    col = lut[np.clip(intensity[keep] * 400, 0, 255).astype(int)]
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < height_px)
    img[v[ok], u[ok]] = col[ok]
    # ego outline and corridor
    rear, front, half = vehicle.rear_offset, vehicle.front_offset, vehicle.width / 2
    corners = np.array([[rear, -half], [front, -half], [front, half], [rear, half]])
    cu, cv_ = px(corners[:, 0], corners[:, 1])
    cv2.polylines(img, [np.stack([cu, cv_], -1).astype(np.int32)], True, (255, 255, 255), 1)
    for side in (-1, 1):
        lu, lv = px(np.array([front, BEV_X[1]]), np.array([side * (half + 0.3)] * 2))
        cv2.line(img, (int(lu[0]), int(lv[0])), (int(lu[1]), int(lv[1])), (90, 90, 90), 1)
    return img


def _text(img: np.ndarray, lines: list[str]) -> None:
    for k, line in enumerate(lines):
        org = (6, 16 + 16 * k)
        cv2.putText(img, line, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, line, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)


def tile(scene: Scene, renderer: CameraRenderer, lidar: LidarSimulator, rng: np.random.Generator) -> np.ndarray:
    """Camera frame (labelled) beside the BEV of one scene."""
    cam = renderer.render(scene, rng).copy()
    pts = lidar.scan(scene, rng)
    t = lidar.rig.lidar_mount.matrix()
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], -1).astype(float)
    base = np.einsum("ij,nj->ni", t[:3, :3], xyz) + t[:3, 3]
    lab = scene.label()
    _text(cam, [f"{scene.scenario.name}  ({scene.lighting.name})",
                f"ego {scene.ego_speed:4.1f} m/s  risk {lab.risk.name}  action {lab.action.name}",
                f"dist {lab.distance:5.1f} m  TTC {lab.ttc:5.1f} s  light {lab.light.name}  "
                f"target {lab.target_speed:4.1f}"])
    bev = bev_image(scene, base, pts["intensity"], cam.shape[0], lidar.rig.vehicle)
    return np.hstack([cam, np.full((cam.shape[0], 4, 3), 255, np.uint8), bev])


def contact_sheet(out: Path, seed: int = 0, rig: SensorRig | None = None, per_family: int = 2) -> Path:
    """Render ``per_family`` moments of every scenario family into the PNG ``out``."""
    rig = rig or replace(SensorRig(), camera=replace(SensorRig().camera, width=640, height=360))
    renderer, lidar = CameraRenderer(rig, noise_seed=seed), LidarSimulator(rig)
    rng = np.random.default_rng(seed)
    rows = []
    for k, fam in enumerate(Scenario):
        tiles = []
        world = World(np.random.default_rng([seed, k]), [fam], vehicle=rig.vehicle)
        for j in range(per_family):
            # the second moment is a fresh episode, later in it
            world.advance(world.episode.t_start + (1.0 if j == 0 else 0.0) + (world.episode.duration + 3.0) * j)
            tiles.append(tile(world.scene(), renderer, lidar, rng))
        rows.append(np.hstack([np.hstack([t, np.full((t.shape[0], 8, 3), 255, np.uint8)]) for t in tiles]))
    sheet = np.vstack([np.vstack([r, np.full((8, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--per-family", type=int, default=2, help="moments per scenario family (default 2)")


def run(args: argparse.Namespace) -> int:
    path = contact_sheet(args.out, args.seed, per_family=max(1, args.per_family))
    print(f"wrote {path}")
    return 0
