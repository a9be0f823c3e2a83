"""A BEV input grid that reaches beyond the occupancy grid (e.g. 16 m behind the rear axle, where the
expert checks the neighbouring lane before a lane change): the occupancy head predicts on the input
grid at half resolution and keeps the occupancy window, so occupancy stays on ``OCCUPANCY_GRID``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmm_fusion.base.grid import OCCUPANCY_GRID
from lmm_fusion.cycle.preprocess import Preprocessor
from lmm_fusion.model import FusionModel, ModelConfig

BACK16 = {"x_min": -16.0, "x_max": 56.0, "y_min": -16.0, "y_max": 16.0, "cell": 0.5}


def _small(**kw: object) -> ModelConfig:
    cfg = ModelConfig(image_height=48, image_width=64, image_roi_rows=16, camera_channels=(4, 8, 8, 16),
                      lidar_stages=(4, 8, 8, 16), d_model=16, n_heads=2, n_layers=1, head_hidden=16,
                      occupancy_channels=4, **kw)  # type: ignore[arg-type]
    cfg.validate()
    return cfg


def test_the_default_grid_is_its_own_occupancy_window() -> None:
    assert ModelConfig().occupancy_window == (0, 0)


def test_a_grid_reaching_back_keeps_occupancy_on_its_grid() -> None:
    cfg = _small(input_grid=BACK16, bev_history_frames=2, bev_history_lag=0.3)
    assert cfg.occupancy_window == (0, 8)  # 8 cells of 1 m between x = -16 m and x = -8 m
    assert cfg.bev_token_shape == (4, 9)
    torch.manual_seed(0)
    model = FusionModel(cfg).eval()
    g = cfg.input_bev_grid
    bev = torch.zeros(2, cfg.bev_input_channels, g.ny, g.nx)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 48, 64), bev, torch.zeros(2, 8), torch.ones(2, 3))
    assert out["occupancy_logits"].shape == (2, *OCCUPANCY_GRID.shape)
    assert torch.isfinite(out["occupancy_logits"]).all()


def test_points_behind_the_old_grid_reach_the_model() -> None:
    pre = Preprocessor(_small(input_grid=BACK16))
    _, ix, inside = pre.grid.indices(np.array([-12.0, -7.0]), np.array([3.5, 3.5]))
    assert inside.tolist() == [True, True] and ix.tolist() == [8, 18]
    assert not Preprocessor(_small()).grid.indices(np.array([-12.0]), np.array([3.5]))[2][0]


@pytest.mark.parametrize("grid", [
    {"x_min": -8.5, "x_max": 55.5, "y_min": -16.0, "y_max": 16.0, "cell": 0.5},  # off the occupancy cell borders
    {"x_min": 0.0, "x_max": 64.0, "y_min": -16.0, "y_max": 16.0, "cell": 0.5},  # does not contain it
    {"x_min": -8.0, "x_max": 56.0, "y_min": -16.0, "y_max": 16.0, "cell": 0.25},  # not half its cell
])
def test_grids_that_do_not_hold_the_occupancy_window_are_refused(grid: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"occupancy_grid .* must be a window of the input grid"):
        ModelConfig(input_grid=grid).validate()
