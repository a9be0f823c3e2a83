"""Pinhole camera render of a :class:`~lmm_fusion.synth.world.Scene` with OpenCV rasterisation.

Painter's algorithm: sky and ground background, then the flat road (surface, lane markings, stop
lines, crosswalks), then boxes from far to near with back faces culled and per-face shading, then
each traffic-light housing's lamps right after the housing. Polygons are clipped against the near
plane in the optical frame before projection, so geometry behind or beside the camera is exact.
Zero distortion: the image matches the ``CameraInfo`` of :func:`camera_info_arrays` exactly.

Lighting: colours are scaled by the episode lighting's gain and pulled towards grey by its
contrast (night: dark and low contrast), lit lamps are emissive (not dimmed) with a glow, and
per-pixel Gaussian noise is added from a pre-drawn noise tile at a random offset (cheap and
deterministic for a given Generator).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.synth.world import LAMP_RADIUS, Lighting, Scene

#: Near clipping plane in the optical frame [m] and farthest rendered distance [m].
NEAR = 0.3
FAR = 220.0
_SHIFT = 4  # fixed-point bits for cv2.fillPoly (sub-pixel edges)
_SCALE = float(1 << _SHIFT)

ROAD_RGB = (88, 88, 92)
GROUND_RGB = (96, 110, 78)
MARKING_RGB = (235, 235, 225)
LAMP_RGB = {"red": (255, 45, 30), "yellow": (255, 190, 25), "green": (40, 255, 120)}
LAMP_OFF_RGB = (45, 45, 45)
#: Vehicle rear lamps by signal: (RGB, radius [m], halo radius as a multiple of the lamp radius).
REAR_LAMPS = {"tail": ((150, 20, 20), 0.07, 1.0), "brake": ((255, 35, 35), 0.1, 2.2),
              "hazard": ((255, 165, 0), 0.1, 2.2)}
#: Box faces in corner indices (corners: bit0 = +x, bit1 = +y, bit2 = +z in the box frame).
_FACES = ((1, 3, 7, 5), (0, 4, 6, 2), (2, 6, 7, 3), (0, 1, 5, 4), (4, 5, 7, 6), (0, 2, 3, 1))
_FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
_CORNER_SIGNS = np.array([[(i & 1) * 2 - 1, ((i >> 1) & 1) * 2 - 1, ((i >> 2) & 1) * 2 - 1] for i in range(8)],
                         float) * 0.5


def camera_info_arrays(rig: SensorRig) -> dict[str, np.ndarray]:
    """``k`` (9,), ``r`` (9,), ``p`` (12,), ``d`` (5,) float64 of the rig's camera (plumb_bob, no distortion)."""
    k = rig.camera.k()
    p = np.zeros((3, 4))
    p[:, :3] = k
    return {"k": k.ravel(), "r": np.eye(3).ravel(), "p": p.ravel(), "d": np.zeros(5)}


def project_points(rig: SensorRig, points_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project base_link points (N, 3) to pixels. Returns ``uv`` (N, 2) float64 and depth ``z`` (N,)
    along the optical axis [m] (points with z <= 0 are behind the camera)."""
    t = np.linalg.inv(rig.camera_optical_to_base())
    p = np.einsum("ni,ji->nj", np.asarray(points_base, float), t[:3, :3]) + t[:3, 3]
    k = rig.camera.k()
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([k[0, 0] * p[:, 0] / z + k[0, 2], k[1, 1] * p[:, 1] / z + k[1, 2]], axis=-1)
    return uv, z


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of an optical-frame polygon (K, 3) against z >= NEAR."""
    z = poly[:, 2]
    if np.all(z >= NEAR):
        return poly
    if np.all(z < NEAR):
        return poly[:0]
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= NEAR, b[2] >= NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


def _shade(color: np.ndarray, lighting: Lighting, factor: float = 1.0) -> tuple[int, int, int]:
    """Surface colour under ``lighting`` (gain and contrast), times a shading ``factor``."""
    c = np.asarray(color, float)
    c = lighting.contrast * c + (1.0 - lighting.contrast) * 110.0
    c = np.clip(c * lighting.gain * factor, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


class CameraRenderer:
    """Renders scenes for one rig. ``render(scene, rng)`` -> (H, W, 3) uint8 RGB."""

    def __init__(self, rig: SensorRig, noise_seed: int = 0) -> None:
        self.rig = rig
        self.cam = rig.camera
        t = rig.camera_optical_to_base()
        self._t_opt = np.linalg.inv(t)  # base_link -> optical
        self._cam_pos = t[:3, 3]
        self.k = self.cam.k()
        self._backgrounds: dict[tuple[str, float], np.ndarray] = {}
        # one N(0, 1) noise tile; per noise level it is split into positive and negative uint8 parts
        # so a frame gets its noise with two saturating cv2.add/subtract calls (no float round trip)
        g = np.random.default_rng(noise_seed)
        h, w = self.cam.height + 16, self.cam.width + 16
        self._noise = g.standard_normal((h, w, 3)).astype(np.float32)
        self._noise_parts: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ helpers
    def _to_opt(self, p: np.ndarray) -> np.ndarray:
        # einsum, not @: OpenBLAS threading overhead dominates for these small products
        return np.einsum("...i,ji->...j", p, self._t_opt[:3, :3]) + self._t_opt[:3, 3]

    def _fill(self, img: np.ndarray, poly_opt: np.ndarray, color: tuple[int, int, int]) -> None:
        poly = _clip_near(poly_opt)
        if len(poly) < 3:
            return
        z = poly[:, 2]
        u = self.k[0, 0] * poly[:, 0] / z + self.k[0, 2]
        v = self.k[1, 1] * poly[:, 1] / z + self.k[1, 2]
        # keep fixed-point coordinates well inside int32 (points just past the near plane can be far out)
        uv = np.clip(np.stack([u, v], -1), -1e5, 1e5)
        pts = np.round(uv * _SCALE).astype(np.int32)
        cv2.fillPoly(img, [pts], color, lineType=cv2.LINE_8, shift=_SHIFT)

    def _background(self, lighting: Lighting, exposure: float) -> np.ndarray:
        key = (lighting.name, round(exposure, 3))
        bg = self._backgrounds.get(key)
        if bg is None:
            h, w = self.cam.height, self.cam.width
            rows = (np.arange(h) + 0.5 - self.k[1, 2]) / self.k[1, 1]
            rays = np.stack([np.zeros(h), rows, np.ones(h)], -1) @ self.rig.camera_optical_to_base()[:3, :3].T
            elev = rays[:, 2] / np.linalg.norm(rays, axis=1)  # sin(elevation) of each row's centre ray
            u = np.clip(elev / 0.5, 0.0, 1.0)[:, None]
            top, hor = np.array(lighting.sky_top, float), np.array(lighting.sky_horizon, float)
            sky = hor * (1 - u) + top * u
            ground = np.array(_shade(np.array(GROUND_RGB), lighting), float)
            haze = np.clip(-elev / 0.03, 0.0, 1.0)[:, None]  # distant ground fades into the horizon
            grd = hor * (1 - haze) * 0.6 + ground * (haze + (1 - haze) * 0.4)
            col = np.where((elev > 0)[:, None], sky, grd) * exposure
            bg = np.repeat(np.clip(col, 0, 255).astype(np.uint8)[:, None, :], w, axis=1)
            self._backgrounds[key] = bg
        return bg

    # ------------------------------------------------------------------ ground
    def _ground_strip(self, scene: Scene, ds: np.ndarray, d0: float, d1: float) -> np.ndarray:
        """Optical-frame polygon of a road-aligned ground strip over ``ds`` samples between lateral d0..d1."""
        a = scene.road.to_base(ds, np.full_like(ds, d0))
        b = scene.road.to_base(ds[::-1], np.full_like(ds, d1))
        return self._to_opt(np.concatenate([a, b]))

    def _fill_many(self, img: np.ndarray, polys_opt: np.ndarray, color: tuple[int, int, int]) -> None:
        """Fill (P, K, 3) optical-frame polygons of one colour with a single cv2.fillPoly call
        (those crossing the near plane are clipped one by one)."""
        if len(polys_opt) == 0:
            return
        z = polys_opt[..., 2]
        front = np.all(z >= NEAR, axis=1)
        out: list[np.ndarray] = []
        if front.any():
            p = polys_opt[front]
            uv = np.stack([self.k[0, 0] * p[..., 0] / p[..., 2] + self.k[0, 2],
                           self.k[1, 1] * p[..., 1] / p[..., 2] + self.k[1, 2]], -1)
            pts = np.round(np.clip(uv, -1e5, 1e5) * _SCALE).astype(np.int32)
            out.extend(pts)
        for poly in polys_opt[~front & np.any(z >= NEAR, axis=1)]:
            self._fill(img, poly, color)
        if out:
            cv2.fillPoly(img, out, color, lineType=cv2.LINE_8, shift=_SHIFT)

    def _quads(self, scene: Scene, s0: np.ndarray, s1: np.ndarray, d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
        """Optical-frame ground quads (P, 4, 3) spanning ``s0..s1`` along and ``d0..d1`` across the road."""
        ds = np.stack([s0, s1, s1, s0], -1)
        dd = np.stack([d0, d0, d1, d1], -1)
        return self._to_opt(scene.road.to_base(ds, dd))

    def _draw_road(self, img: np.ndarray, scene: Scene) -> None:
        r = scene.road
        lit = scene.lighting
        half = r.n_lanes * r.lane_width / 2
        ds = np.concatenate([np.arange(-4.0, 40.0, 4.0), np.arange(40.0, FAR, 12.0), [FAR]])
        if abs(r.kappa) < 1e-9:
            ds = np.array([-4.0, FAR])
        road_c = _shade(np.array(ROAD_RGB), lit)
        mark_c = _shade(np.array(MARKING_RGB), lit, 0.9)
        self._fill(img, self._ground_strip(scene, ds, -half - 0.3, half + 0.3), road_c)
        # solid edge lines
        for edge in (-half + 0.15, half - 0.15):
            self._fill(img, self._ground_strip(scene, ds, edge - 0.08, edge + 0.08), mark_c)
        # dashed lane lines: 3 m dash, 9 m gap, phase fixed on the road (moves as the ego drives);
        # beyond ~110 m a dash is below a pixel wide at any supported resolution
        period, dash = 12.0, 3.0
        starts = np.arange(-(r.s_ego % period) - period, 110.0, period)
        s0, s1, d0, d1 = [], [], [], []
        for i in range(1, r.n_lanes):
            d = -half + i * r.lane_width
            s0.append(starts)
            s1.append(starts + dash)
            d0.append(np.full_like(starts, d - 0.07))
            d1.append(np.full_like(starts, d + 0.07))
        for s_line in scene.stop_lines:
            if -5.0 < s_line < FAR:
                s0.append(np.array([s_line - 0.4]))
                s1.append(np.array([s_line]))
                d0.append(np.array([-half]))
                d1.append(np.array([half]))
        for s_c in scene.crosswalks:
            if -5.0 < s_c < FAR:
                stripes = np.arange(-half + 0.3, half - 0.2, 1.0)
                s0.append(np.full_like(stripes, s_c - 1.5))
                s1.append(np.full_like(stripes, s_c + 1.5))
                d0.append(stripes)
                d1.append(stripes + 0.5)
        if s0:
            self._fill_many(img, self._quads(scene, np.concatenate(s0), np.concatenate(s1), np.concatenate(d0),
                                             np.concatenate(d1)), mark_c)

    # ------------------------------------------------------------------ boxes
    def _draw_boxes(self, img: np.ndarray, scene: Scene) -> None:
        b = scene.boxes
        if len(b) == 0:
            return
        lit = scene.lighting
        sun = np.asarray(lit.sun, float)
        sun = sun / np.linalg.norm(sun)
        c, s = np.cos(b.yaw), np.sin(b.yaw)
        rot = np.zeros((len(b), 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1.0
        corners = b.center[:, None, :] + np.einsum("nij,nkj->nki", rot, _CORNER_SIGNS[None] * b.size[:, None, :])
        normals = np.einsum("nij,fj->nfi", rot, _FACE_NORMALS)  # (N, 6, 3) in base_link
        corners_opt = self._to_opt(corners.reshape(-1, 3)).reshape(-1, 8, 3)
        center_opt = self._to_opt(b.center)
        dist = np.linalg.norm(b.center - self._cam_pos, axis=1)
        radius = 0.5 * np.linalg.norm(b.size, axis=1)
        visible = (center_opt[:, 2] > -radius) & (dist - radius < FAR)
        visible &= radius * self.k[0, 0] >= 0.3 * np.maximum(center_opt[:, 2], 1e-3)  # >= ~half a pixel
        # coarse frustum test: skip boxes entirely left/right of the view
        tan_h = self.cam.width / 2 / self.k[0, 0] + 0.05
        visible &= np.abs(center_opt[:, 0]) - radius <= tan_h * np.maximum(center_opt[:, 2] + radius, 0) + radius
        housings = {i for i, kind in enumerate(b.kind) if kind == "housing"}
        lamps_by_housing = self._lamps_by_housing(scene, housings)
        for i in np.argsort(-dist, kind="stable"):
            if not visible[i]:
                continue
            face_centers = corners[i][list(_FACES)].mean(axis=1)  # (6, 3)
            to_cam = self._cam_pos - face_centers
            facing = np.einsum("fi,fi->f", normals[i], to_cam) > 1e-6
            for f in np.nonzero(facing)[0]:
                lam = max(0.0, float(normals[i, f] @ sun))
                factor = 0.55 + 0.45 * lam if lit.name != "night" else 0.85 + 0.15 * lam
                if f == 4:
                    factor *= 1.05
                self._fill(img, corners_opt[i][list(_FACES[f])], _shade(b.color[i], lit, factor))
            if i in housings:
                self._draw_lamps(img, scene, lamps_by_housing.get(int(i), []))
            if b.signal and b.signal[i] and facing[1]:
                self._draw_rear_lamps(img, b.center[i], rot[i], b.size[i], b.signal[i])

    def _lamps_by_housing(self, scene: Scene, housings: set[int]) -> dict[int, list[int]]:
        """Assign each lamp to the housing box it sits on (nearest centre)."""
        out: dict[int, list[int]] = {}
        if not housings or not scene.lamps:
            return out
        idx = sorted(housings)
        centers = scene.boxes.center[idx]
        for li, lamp in enumerate(scene.lamps):
            j = idx[int(np.argmin(np.linalg.norm(centers - lamp.center, axis=1)))]
            out.setdefault(j, []).append(li)
        return out

    def _glow_dot(self, img: np.ndarray, p_base: np.ndarray, radius: float, col: tuple[int, int, int],
                  glow: float) -> None:
        """An emissive disc of ``radius`` [m] at a base_link point, with a halo ``glow`` times wider
        (at least ~1 px, like a real sensor's bloom)."""
        p = self._to_opt(p_base[None])[0]
        if p[2] < NEAR:
            return
        u = self.k[0, 0] * p[0] / p[2] + self.k[0, 2]
        v = self.k[1, 1] * p[1] / p[2] + self.k[1, 2]
        if not (-50 < u < self.cam.width + 50 and -50 < v < self.cam.height + 50):
            return
        r = radius * self.k[0, 0] / p[2]
        centre = (round(u * _SCALE), round(v * _SCALE))
        if glow > 1.0:
            halo = tuple(int(0.45 * x) for x in col)
            cv2.circle(img, centre, round(max(glow * r, 2.0) * _SCALE), halo, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(img, centre, round(max(r, 1.0) * _SCALE), col, -1, cv2.LINE_AA, _SHIFT)

    def _draw_rear_lamps(self, img: np.ndarray, center: np.ndarray, rot: np.ndarray, size: np.ndarray,
                         signal: str) -> None:
        """Rear lamps of a vehicle (camera-only cue of its motion state): dim red tail lamps, bright
        red brake lamps, amber hazard lamps; a turn signal ("left"/"right", towards +y/-y of the
        vehicle) is an amber lamp outboard of that side's tail lamp, drawn steadily lit (the model
        sees one frame; a blinking lamp would be dark in half of them)."""
        col, radius, glow = REAR_LAMPS.get(signal, REAR_LAMPS["tail"])
        z = -size[2] / 2 + min(0.85, 0.55 * size[2])
        for side in (-1.0, 1.0):
            local = np.array([-size[0] / 2 - 0.02, side * (size[1] / 2 - 0.22), z])
            self._glow_dot(img, center + rot @ local, radius, col, glow)
        if signal in ("left", "right"):
            side = 1.0 if signal == "left" else -1.0
            local = np.array([-size[0] / 2 - 0.02, side * (size[1] / 2 - 0.05), z])
            amber, radius, glow = REAR_LAMPS["hazard"]  # the same lamp as the hazard lights, on one side
            self._glow_dot(img, center + rot @ local, radius, amber, glow)

    def _draw_lamps(self, img: np.ndarray, scene: Scene, lamp_ids: list[int]) -> None:
        for li in lamp_ids:
            lamp = scene.lamps[li]
            if float(lamp.normal @ (self._cam_pos - lamp.center)) <= 0:
                continue  # seen from behind
            p = self._to_opt(lamp.center[None])[0]
            if p[2] < NEAR:
                continue
            u = self.k[0, 0] * p[0] / p[2] + self.k[0, 2]
            v = self.k[1, 1] * p[1] / p[2] + self.k[1, 2]
            r = LAMP_RADIUS * self.k[0, 0] / p[2]
            if not (-50 < u < self.cam.width + 50 and -50 < v < self.cam.height + 50):
                continue
            centre = (round(u * _SCALE), round(v * _SCALE))
            if lamp.lit:
                col = LAMP_RGB[lamp.colour]
                glow = tuple(int(0.45 * x) for x in col)
                # bloom keeps a distant lit lamp a few pixels wide, as on a real sensor
                cv2.circle(img, centre, round(max(2.2 * r, 2.0) * _SCALE), glow, -1, cv2.LINE_AA, _SHIFT)
                cv2.circle(img, centre, round(max(r, 1.0) * _SCALE), col, -1, cv2.LINE_AA, _SHIFT)
            else:
                col = _shade(np.array(LAMP_OFF_RGB), scene.lighting)
                cv2.circle(img, centre, round(max(r, 0.5) * _SCALE), col, -1, cv2.LINE_AA, _SHIFT)

    def _noise_tiles(self, std: float) -> tuple[np.ndarray, np.ndarray]:
        parts = self._noise_parts.get(std)
        if parts is None:
            scaled = np.round(self._noise * std)
            parts = (np.clip(scaled, 0, 255).astype(np.uint8), np.clip(-scaled, 0, 255).astype(np.uint8))
            self._noise_parts[std] = parts
        return parts

    # ------------------------------------------------------------------ frame
    def render(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """The camera image of ``scene``: (H, W, 3) uint8 RGB. ``rng`` draws the noise offset
        (no noise when None)."""
        img = self._background(scene.lighting, 1.0).copy()
        self._draw_road(img, scene)
        self._draw_boxes(img, scene)
        if not math.isclose(scene.exposure, 1.0):
            img = cv2.convertScaleAbs(img, alpha=scene.exposure)
        if rng is not None and scene.lighting.noise_std > 0:
            oy, ox = (int(v) for v in rng.integers(0, 16, size=2))
            h, w = self.cam.height, self.cam.width
            pos, neg = self._noise_tiles(round(scene.lighting.noise_std * scene.noise_scale, 2))
            img = cv2.subtract(cv2.add(img, pos[oy:oy + h, ox:ox + w]), neg[oy:oy + h, ox:ox + w])
        return img
