"""Spinning LiDAR by vectorised ray casting against the ground plane and oriented boxes.

Rays: ``beams`` elevations evenly spread over the rig's vertical field of view times ``columns``
azimuths (column 0 looks along +x of the LiDAR frame, azimuth increasing counter-clockwise).
Every ray is intersected with the ground (z = 0 in base_link) and, with a slab test in each box's
own frame, with every box whose azimuth span covers the ray's column (boxes are culled per column
range, so the cost scales with what is around, not with rays x boxes). The nearest hit wins.

Returns are then perturbed like a real sensor: Gaussian range noise, random dropouts, no return
beyond ``max_range`` or below ``min_range``. Intensity depends on the material's reflectivity and
the incidence angle only (never on paint colour; a traffic-light housing returns the same whether
its lamps show red or green), with lane paint brighter than asphalt.
Points are in the LiDAR frame (``lidar``): x, y, z, intensity (float32), ring (uint16, 0 = lowest beam).
"""

from __future__ import annotations

import math

import numpy as np

from lmm_fusion.base.rig import SensorRig
from lmm_fusion.synth.world import REFLECTIVITY, Scene

#: Structured dtype of the cloud (matches the PointCloud2 fields written to bags).
POINT_DTYPE = np.dtype([("x", np.float32), ("y", np.float32), ("z", np.float32),
                        ("intensity", np.float32), ("ring", np.uint16)])


class LidarSimulator:
    """Ray caster for one rig; ``scan(scene, rng)`` -> structured array of POINT_DTYPE."""

    def __init__(self, rig: SensorRig) -> None:
        self.rig = rig
        m = rig.lidar
        self.model = m
        self.elev = np.radians(np.linspace(m.vfov_min_deg, m.vfov_max_deg, m.beams))
        self.azim = np.arange(m.columns) * (2 * math.pi / m.columns)
        ce, se = np.cos(self.elev), np.sin(self.elev)
        ca, sa = np.cos(self.azim), np.sin(self.azim)
        dirs_lidar = np.stack([ce[:, None] * ca[None], ce[:, None] * sa[None],
                               np.broadcast_to(se[:, None], (m.beams, m.columns))], axis=-1)  # (B, C, 3)
        t = rig.lidar_mount.matrix()
        self._rot = t[:3, :3]
        self.origin = t[:3, 3].copy()  # ray origin in base_link
        # einsum, not @: OpenBLAS threading makes (N, 3) @ (3, 3) slow on busy machines
        self.dirs_lidar = dirs_lidar
        self.dirs = np.einsum("bci,ji->bcj", dirs_lidar, self._rot)  # (B, C, 3) in base_link
        self._dir_base = tuple(np.ascontiguousarray(self.dirs[..., k]) for k in range(3))
        self._dir_lidar = tuple(np.ascontiguousarray(dirs_lidar[..., k]) for k in range(3))
        m_ = rig.lidar_mount
        self._level = abs(m_.roll) < 1e-12 and abs(m_.pitch) < 1e-12
        self.ring = np.broadcast_to(np.arange(m.beams, dtype=np.uint16)[:, None], (m.beams, m.columns))

    def _ground(self) -> np.ndarray:
        """Range [m] to the ground plane per ray (inf where the ray does not descend). (B, C)."""
        dz = self.dirs[..., 2]
        with np.errstate(divide="ignore"):
            t = np.where(dz < -1e-6, -self.origin[2] / dz, np.inf)
        return t

    def _columns_of(self, center: np.ndarray, yaw: float, size: np.ndarray) -> np.ndarray | None:
        """Column indices whose azimuth may see the box (None = all); ``yaw`` is the box's, the mount's
        yaw is taken into account."""
        ln, wd = size[0], size[1]
        c, s = math.cos(yaw), math.sin(yaw)
        cx = np.array([1, 1, -1, -1]) * ln / 2
        cy = np.array([1, -1, 1, -1]) * wd / 2
        px = center[0] + c * cx - s * cy - self.origin[0]
        py = center[1] + s * cx + c * cy - self.origin[1]
        # origin inside the footprint (or very close): every column
        if np.hypot(center[0] - self.origin[0], center[1] - self.origin[1]) < 0.5 * math.hypot(ln, wd) + 0.3:
            return None
        a0 = math.atan2(center[1] - self.origin[1], center[0] - self.origin[0])
        rel = np.remainder(np.arctan2(py, px) - a0 + math.pi, 2 * math.pi) - math.pi
        # Column 0 looks along the LiDAR's +x, which a yawed mount turns away from base_link's +x.
        a0 -= self.rig.lidar_mount.yaw
        lo, hi = a0 + rel.min(), a0 + rel.max()
        step = 2 * math.pi / self.model.columns
        i0 = math.floor(lo / step) - 1
        i1 = math.ceil(hi / step) + 1
        return np.arange(i0, i1 + 1) % self.model.columns

    def _cast_generic(self, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Full 3-D slab test per ray (any mount orientation). Returns range, reflectivity (-1 = ground)
        and |cos incidence|, each (B, C)."""
        m = self.model
        rng_t = self._ground()
        refl = np.full(rng_t.shape, -1.0)  # -1: ground (decided below)
        normal_dot = np.abs(self.dirs[..., 2]).copy()  # |cos| of incidence on the ground
        b = scene.boxes
        reach = m.max_range + 1.0
        for i in range(len(b)):
            center, size, yaw = b.center[i], b.size[i], float(b.yaw[i])
            if np.linalg.norm(center[:2] - self.origin[:2]) - 0.5 * np.linalg.norm(size) > reach:
                continue
            cols = self._columns_of(center, yaw, size)
            d = self.dirs if cols is None else self.dirs[:, cols]
            c, s = math.cos(yaw), math.sin(yaw)
            # into the box frame: rotate by -yaw
            o = self.origin - center
            o_b = np.array([c * o[0] + s * o[1], -s * o[0] + c * o[1], o[2]])
            dx = c * d[..., 0] + s * d[..., 1]
            dy = -s * d[..., 0] + c * d[..., 1]
            dz = d[..., 2]
            half = size / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                tmin = np.full(dx.shape, -np.inf)
                tmax = np.full(dx.shape, np.inf)
                axis_hit = np.zeros(dx.shape, dtype=np.int8)
                for k, dk in enumerate((dx, dy, dz)):
                    inv = 1.0 / dk
                    t1 = (-half[k] - o_b[k]) * inv
                    t2 = (half[k] - o_b[k]) * inv
                    near = np.minimum(t1, t2)
                    far = np.maximum(t1, t2)
                    parallel = ~np.isfinite(inv)
                    if parallel.any():  # ray parallel to this slab: inside it or never
                        inside = abs(o_b[k]) <= half[k]
                        near = np.where(parallel, -np.inf if inside else np.inf, near)
                        far = np.where(parallel, np.inf if inside else -np.inf, far)
                    upd = near > tmin
                    axis_hit = np.where(upd, k, axis_hit)
                    tmin = np.maximum(tmin, near)
                    tmax = np.minimum(tmax, far)
            hit = (tmax >= tmin) & (tmin > 0.0)
            if cols is None:
                cur = rng_t
                closer = hit & (tmin < cur)
                rng_t = np.where(closer, tmin, rng_t)
                refl = np.where(closer, b.reflectivity[i], refl)
                nd = np.abs(np.choose(axis_hit, (dx, dy, dz)))
                normal_dot = np.where(closer, nd, normal_dot)
            else:
                cur = rng_t[:, cols]
                closer = hit & (tmin < cur)
                if not closer.any():
                    continue
                nd = np.abs(np.choose(axis_hit, (dx, dy, dz)))
                rng_t[:, cols] = np.where(closer, tmin, cur)
                refl[:, cols] = np.where(closer, b.reflectivity[i], refl[:, cols])
                normal_dot[:, cols] = np.where(closer, nd, normal_dot[:, cols])
        return rng_t, refl, normal_dot

    def _cast_level(self, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ray casting for a level LiDAR (roll = pitch = 0), where each beam has one elevation and
        each column one horizontal direction. The box test then splits into a 2-D slab test per
        column (x, y in the box frame) and a height interval per beam, combined by an outer
        max/min: O(beams + columns) trigonometry per box and a few cheap ops per covered ray.
        Works in horizontal distance rho; returns range, reflectivity (-1 = ground) and
        |cos incidence|, each (B, C)."""
        m = self.model
        oz = self.origin[2]
        tan_e = np.tan(self.elev)
        cos_e, sin_e = np.cos(self.elev), np.abs(np.sin(self.elev))
        with np.errstate(divide="ignore"):
            rho_ground = np.where(tan_e < -1e-6, oz / -tan_e, np.inf)
        rho = np.repeat(rho_ground[:, None], m.columns, axis=1)
        refl = np.full(rho.shape, -1.0)
        cosinc = np.repeat(sin_e[:, None], m.columns, axis=1)
        az = self.azim + self.rig.lidar_mount.yaw
        b = scene.boxes
        reach = m.max_range + 1.0
        for i in range(len(b)):
            center, size, yaw = b.center[i], b.size[i], float(b.yaw[i])
            dist = math.hypot(center[0] - self.origin[0], center[1] - self.origin[1])
            radius = 0.5 * math.hypot(size[0], size[1])
            if dist - radius > reach:
                continue
            # beams that can reach the box's height band somewhere within its horizontal distance span
            z0, z1 = center[2] - size[2] / 2 - oz, center[2] + size[2] / 2 - oz
            rmin, rmax = max(dist - radius, 0.0), dist + radius
            e_lo = math.atan2(z0, rmax if z0 > 0 else max(rmin, 1e-3))
            e_hi = math.atan2(z1, max(rmin, 1e-3) if z1 > 0 else rmax)
            beams = np.nonzero((self.elev >= e_lo - 1e-3) & (self.elev <= e_hi + 1e-3))[0]
            if beams.size == 0:
                continue
            bs = slice(int(beams[0]), int(beams[-1]) + 1)
            te = tan_e[bs]
            with np.errstate(divide="ignore", invalid="ignore"):
                za, zb = z0 / te, z1 / te
                flat = np.abs(te) < 1e-9
                rz_lo = np.where(flat, np.where((z0 <= 0) & (z1 >= 0), 0.0, np.inf), np.minimum(za, zb))
                rz_hi = np.where(flat, np.where((z0 <= 0) & (z1 >= 0), np.inf, -np.inf), np.maximum(za, zb))
            c, s = math.cos(yaw), math.sin(yaw)
            ox, oy = self.origin[0] - center[0], self.origin[1] - center[1]
            obx, oby = c * ox + s * oy, -s * ox + c * oy
            for cs in self._column_slices(center, yaw, size):
                a = az[cs] - yaw
                dx, dy = np.cos(a), np.sin(a)
                with np.errstate(divide="ignore", invalid="ignore"):
                    tx1, tx2 = (-size[0] / 2 - obx) / dx, (size[0] / 2 - obx) / dx
                    ty1, ty2 = (-size[1] / 2 - oby) / dy, (size[1] / 2 - oby) / dy
                # rays parallel to a slab: inside it (always) or outside (never)
                tx_lo = np.where(dx == 0, np.where(abs(obx) <= size[0] / 2, -np.inf, np.inf), np.minimum(tx1, tx2))
                tx_hi = np.where(dx == 0, np.where(abs(obx) <= size[0] / 2, np.inf, -np.inf), np.maximum(tx1, tx2))
                ty_lo = np.where(dy == 0, np.where(abs(oby) <= size[1] / 2, -np.inf, np.inf), np.minimum(ty1, ty2))
                ty_hi = np.where(dy == 0, np.where(abs(oby) <= size[1] / 2, np.inf, -np.inf), np.maximum(ty1, ty2))
                r_in = np.maximum(tx_lo, ty_lo)
                r_out = np.minimum(tx_hi, ty_hi)
                side_cos = np.where(tx_lo > ty_lo, np.abs(dx), np.abs(dy))
                enter = np.maximum(r_in[None, :], rz_lo[:, None])
                exit_ = np.minimum(r_out[None, :], rz_hi[:, None])
                cur = rho[bs, cs]
                closer = (enter <= exit_) & (enter > 0.0) & (enter < cur)
                if not closer.any():
                    continue
                rho[bs, cs] = np.where(closer, enter, cur)
                refl[bs, cs] = np.where(closer, b.reflectivity[i], refl[bs, cs])
                top = rz_lo[:, None] > r_in[None, :]
                inc = np.where(top, sin_e[bs, None], side_cos[None, :] * cos_e[bs, None])
                cosinc[bs, cs] = np.where(closer, inc, cosinc[bs, cs])
        rng_t = rho / cos_e[:, None]
        return rng_t, refl, cosinc

    def _column_slices(self, center: np.ndarray, yaw: float, size: np.ndarray) -> list[slice]:
        """Column ranges (as slices, split at the wrap-around) that may see the box."""
        cols = self._columns_of(center, yaw, size)
        n = self.model.columns
        if cols is None or cols.size >= n:
            return [slice(0, n)]
        i0, i1 = int(cols[0]), int(cols[-1])
        if i0 <= i1:
            return [slice(i0, i1 + 1)]
        return [slice(i0, n), slice(0, i1 + 1)]

    def scan(self, scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
        """One revolution. Returns an array of POINT_DTYPE (N,), LiDAR frame, beam-major order."""
        m = self.model
        if self._level:
            rng_t, refl, normal_dot = self._cast_level(scene)
        else:
            rng_t, refl, normal_dot = self._cast_generic(scene)
        valid = np.isfinite(rng_t) & (rng_t >= m.min_range) & (rng_t <= m.max_range)
        # 1-D gathers of per-component (B, C) arrays: much faster than gathering (N, 3) rows
        r = rng_t[valid]
        refl_v = refl[valid]
        nd_v = normal_dot[valid]
        ground = refl_v < 0
        if ground.any():
            rg = r[ground]
            gx = self.origin[0] + self._dir_base[0][valid][ground] * rg  # exact ground hits, base_link
            gy = self.origin[1] + self._dir_base[1][valid][ground] * rg
            ds, d = _road_coords(scene, gx, gy)
            g = np.where(_is_paint(scene, ds, d), REFLECTIVITY["paint"], REFLECTIVITY["asphalt"])
            g[np.abs(d) > scene.road.n_lanes * scene.road.lane_width / 2 + 0.3] = REFLECTIVITY["ground"]
            refl_v[ground] = g
        n = r.shape[0]
        if rng is not None:
            std = m.range_noise_std * scene.noise_scale
            dropout = m.dropout if scene.lidar_dropout is None else scene.lidar_dropout
            r_noisy = r + rng.standard_normal(n, dtype=np.float32) * np.float32(std)
            keep = rng.random(n, dtype=np.float32) >= dropout
            inten_noise = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        else:
            r_noisy, keep, inten_noise = r, np.ones(n, bool), np.zeros(n)
        intensity = np.clip(refl_v * (0.4 + 0.6 * nd_v) + inten_noise, 0.0, 1.0)
        r_k = r_noisy[keep]
        out = np.empty(r_k.shape[0], dtype=POINT_DTYPE)
        for name, comp in zip(("x", "y", "z"), self._dir_lidar):  # LiDAR frame: sensor origin, own axes
            out[name] = comp[valid][keep] * r_k
        out["intensity"] = intensity[keep]
        out["ring"] = self.ring[valid][keep]
        return out


def _road_coords(scene: Scene, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Road coordinates (ds, d) of base_link ground points (x, y) [m] (exact for the constant-curvature road)."""
    k = scene.road.kappa
    if abs(k) < 1e-9:
        return x, y + scene.road.d_ego
    # polar about the arc centre (0, 1/k - d_ego)
    cy = 1.0 / k - scene.road.d_ego
    dx, dy = x, y - cy
    rad = np.hypot(dx, dy)
    ang = np.arctan2(dx, -dy) if k > 0 else np.arctan2(dx, dy)
    d = (1.0 / abs(k) - rad) * np.sign(k)
    return ang / abs(k), d


def _is_paint(scene: Scene, ds: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Whether ground points at road coordinates (ds, d) lie on lane markings, stop lines or crosswalk
    stripes (as the camera draws them)."""
    r = scene.road
    half = r.n_lanes * r.lane_width / 2
    paint = (np.abs(np.abs(d) - (half - 0.15)) < 0.08)
    phase = np.remainder(ds + r.s_ego, 12.0)
    for i in range(1, r.n_lanes):
        paint |= (np.abs(d - (-half + i * r.lane_width)) < 0.07) & (phase < 3.0)
    on_road = np.abs(d) <= half
    for s_line in scene.stop_lines:
        paint |= on_road & (ds >= s_line - 0.4) & (ds <= s_line)
    for s_c in scene.crosswalks:
        stripe = np.remainder(d + half - 0.3, 1.0) < 0.5
        paint |= on_road & (np.abs(ds - s_c) <= 1.5) & stripe & (d < half - 0.2)
    return paint


# ---------------------------------------------------------------------------------------- driver layouts
#: Point fields as the ROS drivers write them (name, numpy type, byte offset; itemsize = point_step):
#: ros-drivers/velodyne ``PointXYZIRT`` (time: seconds since the scan's first firing) and ouster-ros'
#: ``original`` layout (x, y, z padded to 16 bytes; t: nanoseconds since the scan start; range: mm).
DRIVER_LAYOUTS: dict[str, np.dtype] = {
    "default": POINT_DTYPE,
    "velodyne": np.dtype({"names": ["x", "y", "z", "intensity", "ring", "time"],
                          "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"],
                          "offsets": [0, 4, 8, 12, 16, 18], "itemsize": 22}),
    "ouster": np.dtype({"names": ["x", "y", "z", "intensity", "t", "reflectivity", "ring", "ambient", "range"],
                        "formats": ["<f4", "<f4", "<f4", "<f4", "<u4", "<u2", "<u2", "<u2", "<u4"],
                        "offsets": [0, 4, 8, 16, 20, 24, 26, 28, 32], "itemsize": 48}),
}


def driver_points(points: np.ndarray, rig: SensorRig) -> np.ndarray:
    """The simulator's POINT_DTYPE cloud in the rig LiDAR's driver layout (``rig.lidar.layout``, one of
    :data:`DRIVER_LAYOUTS`) and intensity unit: intensity (0..1 from the simulator) times
    ``rig.lidar.intensity_scale`` (e.g. 255 for a Velodyne; none = 0..1 as the model was trained). The
    per-point times follow the azimuth (one revolution per ``1 / rate_hz`` s, counter-clockwise from +x)."""
    m = rig.lidar
    scale = np.float32(m.intensity_scale or 1.0)
    dtype = DRIVER_LAYOUTS.get(m.layout)
    if dtype is None:
        raise ValueError(f"lidar.layout: {m.layout!r} is not one of {', '.join(DRIVER_LAYOUTS)}")
    out = np.zeros(points.shape[0], dtype)
    for name in ("x", "y", "z", "ring"):
        out[name] = points[name]
    out["intensity"] = points["intensity"] * scale
    if m.layout == "default":
        return out
    azimuth = np.mod(np.arctan2(points["y"], points["x"]), 2 * np.pi)
    t = azimuth / (2 * np.pi) / m.rate_hz  # [s] since the scan start
    if m.layout == "velodyne":
        out["time"] = t
    else:
        out["t"] = np.rint(t * 1e9).astype(np.uint32)
        out["reflectivity"] = np.clip(points["intensity"] * 255.0, 0, 255).astype(np.uint16)
        out["ambient"] = 0
        r = np.sqrt(points["x"].astype(np.float64) ** 2 + points["y"] ** 2 + points["z"] ** 2)
        out["range"] = np.rint(r * 1000.0).astype(np.uint32)
    return out
