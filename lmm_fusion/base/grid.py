"""Bird's-eye-view grids in ``base_link`` (x forward, y left; metres).

Array convention everywhere (model input, predicted and ground-truth occupancy, OccupancyGrid
messages): shape ``(ny, nx)``, row ``iy`` along +y, column ``ix`` along +x, cell ``(iy, ix)`` centred
at ``(x_min + (ix + 0.5) * cell, y_min + (iy + 0.5) * cell)``. This is exactly the row-major layout
of ``nav_msgs/OccupancyGrid`` with its origin at ``(x_min, y_min)``, so no transpose is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BevGrid:
    x_min: float = -8.0
    x_max: float = 56.0
    y_min: float = -16.0
    y_max: float = 16.0
    cell: float = 0.5

    @property
    def nx(self) -> int:
        return round((self.x_max - self.x_min) / self.cell)

    @property
    def ny(self) -> int:
        return round((self.y_max - self.y_min) / self.cell)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        return (self.ny, self.nx)

    def indices(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell indices of points. Returns ``(iy, ix, inside)``; ``iy``/``ix`` are int64 and only
        meaningful where ``inside`` is True."""
        ix = np.floor((x - self.x_min) / self.cell).astype(np.int64)
        iy = np.floor((y - self.y_min) / self.cell).astype(np.int64)
        inside = (ix >= 0) & (ix < self.nx) & (iy >= 0) & (iy < self.ny)
        return iy, ix, inside

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell centre coordinates ``(xc, yc)``, each of shape (ny, nx), float32 metres."""
        xs = self.x_min + (np.arange(self.nx, dtype=np.float32) + 0.5) * self.cell
        ys = self.y_min + (np.arange(self.ny, dtype=np.float32) + 0.5) * self.cell
        xc, yc = np.meshgrid(xs, ys)
        return xc.astype(np.float32), yc.astype(np.float32)

    def as_dict(self) -> dict[str, float]:
        return {"x_min": self.x_min, "x_max": self.x_max, "y_min": self.y_min, "y_max": self.y_max,
                "cell": self.cell}


#: Grid of the LiDAR BEV pseudo-image fed to the model (128 x 64 cells of 0.5 m).
INPUT_GRID = BevGrid(cell=0.5)
#: Grid of predicted and ground-truth occupancy (64 x 32 cells of 1 m).
OCCUPANCY_GRID = BevGrid(cell=1.0)
