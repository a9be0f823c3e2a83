"""Output heads: classification, bounded regressions and the BEV occupancy decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmm_fusion.base.vocabulary import Action, Light, Risk
from lmm_fusion.model.config import ModelConfig


class Heads(nn.Module):
    """Fused query vector ``(B, Q*d)`` -> class logits and bounded regressions.

    Regressions go through a sigmoid times their cap, so ``ttc`` lies in ``[0, ttc_max]`` s,
    ``obstacle_distance`` in ``[0, distance_max]`` m and ``target_speed`` in ``[0, speed_max]`` m/s.
    Returns ``(outputs, trunk)`` where ``trunk (B, head_hidden)`` also conditions the occupancy head.
    """

    caps: torch.Tensor  # (3,) buffer: speed [m/s], ttc [s], distance [m] caps

    def __init__(self, cfg: ModelConfig, d_in: int) -> None:
        super().__init__()
        h = cfg.head_hidden
        self.trunk = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.risk = nn.Linear(h, len(Risk))
        self.action = nn.Linear(h, len(Action))
        self.light = nn.Linear(h, len(Light))
        self.regress = nn.Linear(h, 3)  # target speed, ttc, distance (before sigmoid)
        self.register_buffer("caps", torch.tensor([cfg.speed_max, cfg.ttc_max, cfg.distance_max]),
                             persistent=False)

    def forward(self, fused: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t = self.trunk(fused)
        reg = torch.sigmoid(self.regress(t)) * self.caps
        out = {
            "risk_logits": self.risk(t),
            "action_logits": self.action(t),
            "light_logits": self.light(t),
            "target_speed": reg[:, 0],
            "ttc": reg[:, 1],
            "obstacle_distance": reg[:, 2],
        }
        return out, t


class OccupancyHead(nn.Module):
    """Occupancy logits ``(B, ny, nx)`` on the occupancy grid (half the input BEV resolution; a window of
    the input grid when that reaches further, see :attr:`ModelConfig.occupancy_window`).

    Inputs: the trunk vector ``(B, h)`` (scene context; also the only source when LiDAR is masked),
    the stride-2 BEV feature map ``(B, c0, ny, nx)`` (local geometry) and the fused BEV tokens
    ``(B, Nb, d)`` on the ``bev_tokens`` grid (context after attention), both already zeroed when
    LiDAR is masked.
    """

    def __init__(self, cfg: ModelConfig, bev_tokens: tuple[int, int]) -> None:
        super().__init__()
        grid = cfg.occupancy_bev_grid
        self.ny, self.nx = grid.shape
        self.y0, self.x0 = cfg.occupancy_window  # the input grid may reach beyond the occupancy grid
        half = (cfg.input_bev_grid.ny // 2, cfg.input_bev_grid.nx // 2)
        self.tok_hw = bev_tokens
        self.up = (half[0] // bev_tokens[0], half[1] // bev_tokens[1])
        c0, h, d = cfg.lidar_stages[0], cfg.head_hidden, cfg.d_model
        c = cfg.occupancy_channels
        self.coarse = nn.Linear(h, bev_tokens[0] * bev_tokens[1])
        self.film = nn.Linear(h, c)
        self.skip = nn.Conv2d(c0, c, 3, padding=1)
        self.tok = nn.Conv2d(d, c, 1)
        self.mix = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c, 1, 1))

    def forward(self, trunk: torch.Tensor, skip: torch.Tensor, bev_tokens: torch.Tensor) -> torch.Tensor:
        b = trunk.shape[0]
        th, tw = self.tok_hw
        tok = bev_tokens.transpose(1, 2).reshape(b, -1, th, tw)
        tok = F.interpolate(self.tok(tok), scale_factor=self.up, mode="nearest")
        coarse = F.interpolate(self.coarse(trunk).reshape(b, 1, th, tw), scale_factor=self.up, mode="nearest")
        h = self.skip(skip) + tok + self.film(trunk)[:, :, None, None]
        return (self.mix(h) + coarse)[:, 0, self.y0:self.y0 + self.ny, self.x0:self.x0 + self.nx]
