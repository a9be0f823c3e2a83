"""One configuration dataclass for the whole fusion model, saved as ``config.json`` with the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lmm_fusion.base.grid import INPUT_GRID, OCCUPANCY_GRID, BevGrid

#: Bumped when the meaning of a field or of a tensor changes incompatibly.
CONFIG_VERSION = 2


@dataclass
class ModelConfig:
    """Sizes, resolutions and output caps of :class:`lmm_fusion.model.FusionModel`.

    Image input: ``(3, image_height, image_width)`` RGB normalised with ``image_mean``/``image_std``; with
    ``image_roi_rows > 0`` its top rows are a close-up of the ``image_roi`` window (where distant traffic
    lights appear) and the rest is the whole view (see :meth:`lmm_fusion.cycle.preprocess.Preprocessor.resize_image`).
    BEV input: ``(bev_input_channels, ny, nx)`` on ``input_grid`` (metres in ``base_link``): the current
    LiDAR frame's ``bev_channels`` followed by the same channels of ``bev_history_frames`` earlier frames,
    ``bev_history_lag``, 2 x ``bev_history_lag``, ... seconds older
    (see :class:`lmm_fusion.cycle.preprocess.BevHistory`).
    Ego input: ``(ego_features,)`` built by :class:`lmm_fusion.cycle.preprocess.Preprocessor`.
    """

    # --- camera
    image_height: int = 176
    image_width: int = 224
    image_mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    camera_channels: tuple[int, ...] = (8, 16, 32, 64)  # one stride-2 stage each
    # Close-up band: a window of the source image, in fractions of its width/height (u0, v0, u1, v1),
    # resized into the top ``image_roi_rows`` rows. Why: a traffic-light lamp (0.22 m) 50 m away is
    # 1.4 px wide in a 640 px image and a third of a pixel after the whole view is shrunk to 224 px,
    # so its colour is lost; the window above the horizon in front, where far lamps appear, keeps
    # near-native resolution instead. Near lamps are large enough in the whole view.
    image_roi_rows: int = 64
    # How the whole view is shrunk: "area" = one INTER_AREA resize; "decimate_area" = an exact
    # integer box decimation first, then INTER_AREA for the remaining factor (the same averaging
    # up to the last fraction of a pixel, 2.3x faster from 1280x720: the non-integer area path of
    # OpenCV is the slow one). Part of the model contract: a model sees what it was trained on.
    image_resize: str = "decimate_area"
    image_roi: tuple[float, float, float, float] = (0.3, 0.24, 0.7, 0.5)
    # --- LiDAR BEV pseudo-image
    input_grid: dict[str, float] = field(default_factory=INPUT_GRID.as_dict)
    bev_channels: int = 4  # max height, mean height, log-density, mean intensity
    bev_z_min: float = -1.0  # points below/above this height in base_link [m] are dropped
    bev_z_max: float = 4.0
    bev_height_scale: float = 2.0  # heights are divided by this [m]
    bev_density_scale: float = 4.0  # log1p(count) is divided by this
    bev_intensity_scale: float = 1.0  # intensity is divided by this
    # Earlier LiDAR frames stacked behind the current one, in the same base_link grid (not ego-motion
    # compensated on purpose: an object's shift between the frames is its motion relative to the ego,
    # which is what closing speed, TTC and "stopped or moving" need and a single frame cannot show).
    bev_history_frames: int = 1
    bev_history_lag: float = 0.5  # [s] between stacked frames
    lidar_stages: tuple[int, ...] = (16, 24, 48, 64)  # one stride-2 stage each
    refine_from_stage: int = 2  # stages >= this add a residual 3x3 conv (camera and BEV)
    occupancy_channels: int = 16
    # --- GNSS / ego motion
    ego_features: int = 8
    ego_tokens: int = 2
    speed_scale: float = 10.0  # [m/s]
    accel_scale: float = 3.0  # [m/s^2]
    yaw_rate_scale: float = 0.5  # [rad/s]
    # --- fusion transformer
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    n_queries: int = 4
    ff_mult: int = 2
    dropout: float = 0.0
    head_hidden: int = 128
    # Heads of an attention pool over the camera tokens whose result reaches the decision heads
    # directly (gated by the camera mask); 0 = none. Why: the lamp colour exists only in the image,
    # and ~150 camera tokens compete with the LiDAR's for the few query tokens of the fusion.
    camera_pool_heads: int = 4
    # --- outputs
    occupancy_grid: dict[str, float] = field(default_factory=OCCUPANCY_GRID.as_dict)
    ttc_max: float = 10.0  # [s]; the value that means "no closing obstacle"
    distance_max: float = 50.0  # [m]; the value that means "lane free"
    speed_max: float = 30.0  # [m/s]; target speed upper bound
    version: int = CONFIG_VERSION

    # ---------------------------------------------------------------- derived
    @property
    def input_bev_grid(self) -> BevGrid:
        return BevGrid(**self.input_grid)

    @property
    def occupancy_bev_grid(self) -> BevGrid:
        return BevGrid(**self.occupancy_grid)

    @property
    def occupancy_window(self) -> tuple[int, int]:
        """(row, column) of the occupancy grid's first cell on the half-resolution input grid.

        The occupancy head predicts on the input grid at twice its cell size and keeps this window, so
        the input may reach further (e.g. behind the ego, where the expert looks at the neighbouring
        lane) than the occupancy that is scored. Raises ``ValueError`` when the grids do not align."""
        g, o = self.input_bev_grid, self.occupancy_bev_grid
        half = (g.ny // 2, g.nx // 2)
        ox, oy = (o.x_min - g.x_min) / o.cell, (o.y_min - g.y_min) / o.cell
        if (abs(o.cell - 2 * g.cell) > 1e-9 or g.ny % 2 or g.nx % 2 or abs(ox - round(ox)) > 1e-6
                or abs(oy - round(oy)) > 1e-6 or ox < 0 or oy < 0 or round(oy) + o.ny > half[0]
                or round(ox) + o.nx > half[1]):
            raise ValueError(f"occupancy_grid {o.as_dict()} must be a window of the input grid {g.as_dict()} at "
                             "twice its cell size, on its cell borders")
        return round(oy), round(ox)

    @property
    def bev_input_channels(self) -> int:
        """Channels of the BEV input tensor: the current frame's plus every history frame's."""
        return self.bev_channels * (1 + self.bev_history_frames)

    @property
    def camera_token_shape(self) -> tuple[int, int]:
        """(rows, cols) of the camera token grid."""
        s = 2 ** len(self.camera_channels)
        return (-(-self.image_height // s), -(-self.image_width // s))

    @property
    def bev_token_shape(self) -> tuple[int, int]:
        """(rows, cols) of the BEV token grid."""
        g = self.input_bev_grid
        s = 2 ** len(self.lidar_stages)
        return (-(-g.ny // s), -(-g.nx // s))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("image_height", "image_width", "d_model", "n_heads", "n_layers", "n_queries",
                     "ego_features", "ego_tokens", "bev_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.bev_channels != 4:
            raise ValueError(f"bev_channels={self.bev_channels}: the preprocessor produces 4 channels")
        if not 0 <= self.image_roi_rows <= self.image_height - 16:
            raise ValueError(f"image_roi_rows={self.image_roi_rows} must be in 0..image_height-16 "
                             f"({self.image_height - 16}): the whole view needs rows too")
        if self.image_resize not in ("area", "decimate_area"):
            raise ValueError(f"image_resize={self.image_resize!r} must be 'area' or 'decimate_area'")
        roi = [float(x) for x in self.image_roi]
        if len(roi) != 4 or not (0.0 <= roi[0] < roi[2] <= 1.0 and 0.0 <= roi[1] < roi[3] <= 1.0):
            raise ValueError(f"image_roi={list(self.image_roi)} must be (u0, v0, u1, v1) with 0 <= u0 < u1 <= 1 "
                             "and 0 <= v0 < v1 <= 1")
        if not 0 <= self.camera_pool_heads <= 16:
            raise ValueError(f"camera_pool_heads={self.camera_pool_heads} must be in 0..16")
        if not 0 <= self.bev_history_frames <= 8:
            raise ValueError(f"bev_history_frames={self.bev_history_frames} must be in 0..8")
        if not 0.05 <= self.bev_history_lag <= 5.0:
            raise ValueError(f"bev_history_lag={self.bev_history_lag} must be in [0.05, 5] s")
        if self.ego_features < 8:
            raise ValueError(f"ego_features={self.ego_features}: the preprocessor needs at least 8")
        g = self.input_bev_grid
        s = 2 ** len(self.lidar_stages)
        if g.ny % s or g.nx % s:
            raise ValueError(f"input_grid {g.shape} is not divisible by the BEV stride {s}")
        _ = self.occupancy_window  # raises ValueError naming both grids when they do not fit
        for name in ("ttc_max", "distance_max", "speed_max"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error (a typo must not silently use a default)."""
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        defaults = asdict(cls())
        for k, v in data.items():
            _check_type(k, v, defaults[k])
            kwargs[k] = tuple(v) if isinstance(v, list) else v
        cfg = cls(**kwargs)
        if cfg.version != CONFIG_VERSION:
            raise ValueError(f"config version={cfg.version} is not supported (expected {CONFIG_VERSION})")
        cfg.validate()
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read ``path``; raises ``ValueError`` naming the file (and field) for any invalid content."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: invalid model config: {exc}") from exc


def _check_type(name: str, value: Any, default: Any) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` does not have the JSON type of ``default``
    (a number where a list is expected would otherwise fail deep inside the model constructor)."""
    def ok(v: Any, d: Any) -> bool:
        if isinstance(d, bool) or isinstance(v, bool):
            return isinstance(v, bool) and isinstance(d, bool)
        if isinstance(d, int):
            return isinstance(v, int)
        if isinstance(d, float):
            return isinstance(v, int | float)
        if isinstance(d, str):
            return isinstance(v, str)
        if isinstance(d, tuple | list):
            return isinstance(v, list | tuple) and all(ok(x, d[0]) for x in v) if d else isinstance(v, list)
        if isinstance(d, dict):
            return isinstance(v, dict) and set(v) == set(d) and all(ok(v[k], d[k]) for k in d)
        return True

    if not ok(value, default):
        raise ValueError(f"{name}={value!r}: expected a value like {default!r}")
