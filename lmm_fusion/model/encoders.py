"""Per-modality encoders: each turns one sensor's preprocessed input into ``d_model`` tokens.

All encoders are plain conv/linear stacks with static shapes, so they export to ONNX and TensorRT
without surprises.
"""

from __future__ import annotations

import torch
from torch import nn

from lmm_fusion.model.config import ModelConfig


def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU (BatchNorm folds into the conv on export)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _StridedCnn(nn.Module):
    """A stack of stages, each a stride-2 conv; stages from ``refine_from`` on add a residual
    stride-1 conv (the early, high-resolution stages skip it: they dominate the CPU cost)."""

    def __init__(self, c_in: int, channels: tuple[int, ...], refine_from: int) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        self.refine = nn.ModuleList()
        prev = c_in
        for i, c in enumerate(channels):
            self.down.append(conv_bn(prev, c, 2))
            self.refine.append(conv_bn(c, c, 1) if i >= refine_from else nn.Identity())
            prev = c
        self.refine_from = refine_from

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns the feature map after every stage (strides 2, 4, 8, ...)."""
        feats = []
        for i, (down, refine) in enumerate(zip(self.down, self.refine)):
            x = down(x)
            if i >= self.refine_from:
                x = x + refine(x)
            feats.append(x)
        return feats


class CameraEncoder(nn.Module):
    """Image ``(B, 3, H, W)`` -> tokens ``(B, Hc*Wc, d_model)`` on a ``H/16 x W/16`` grid (4 stages)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cnn = _StridedCnn(3, tuple(cfg.camera_channels), cfg.refine_from_stage)
        self.proj = nn.Conv2d(cfg.camera_channels[-1], cfg.d_model, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.cnn(image)[-1])  # (B, d, Hc, Wc)
        return x.flatten(2).transpose(1, 2)


class BevEncoder(nn.Module):
    """BEV pseudo-image ``(B, C, ny, nx)`` -> tokens ``(B, ny/16 * nx/16, d_model)`` and the
    stride-2 feature map ``(B, c0, ny/2, nx/2)`` (the occupancy head's geometric skip input)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cnn = _StridedCnn(cfg.bev_input_channels, tuple(cfg.lidar_stages), cfg.refine_from_stage)
        self.proj = nn.Conv2d(cfg.lidar_stages[-1], cfg.d_model, 1)

    def forward(self, bev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.cnn(bev)
        x = self.proj(feats[-1])
        return x.flatten(2).transpose(1, 2), feats[0]


class EgoEncoder(nn.Module):
    """Ego-motion features ``(B, F)`` -> tokens ``(B, ego_tokens, d_model)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_tokens = cfg.ego_tokens
        self.d = cfg.d_model
        self.mlp = nn.Sequential(
            nn.Linear(cfg.ego_features, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.head_hidden, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.head_hidden, cfg.ego_tokens * cfg.d_model),
        )

    def forward(self, ego: torch.Tensor) -> torch.Tensor:
        return self.mlp(ego).reshape(ego.shape[0], self.n_tokens, self.d)
