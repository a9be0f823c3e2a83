"""Attention fusion of camera, LiDAR and ego tokens, and the full :class:`FusionModel`.

Attention is written by hand (no ``nn.MultiheadAttention``): static shapes, batch first, an additive
``-1e4`` bias on the keys of masked modalities. Learned query tokens are never masked, so every
softmax row has at least one valid key and the all-sensors-missing case stays finite.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmm_fusion.base.vocabulary import MODALITIES
from lmm_fusion.model.config import ModelConfig
from lmm_fusion.model.encoders import BevEncoder, CameraEncoder, EgoEncoder
from lmm_fusion.model.heads import Heads, OccupancyHead

#: Names of the model outputs, in the order the ONNX graph lists them.
OUTPUT_NAMES: tuple[str, ...] = (
    "risk_logits",
    "action_logits",
    "light_logits",
    "target_speed",
    "ttc",
    "obstacle_distance",
    "occupancy_logits",
    "modality_attention",
)
#: Names of the model inputs, in call order.
INPUT_NAMES: tuple[str, ...] = ("image", "bev", "ego", "modality_mask")



class FusionForward(Protocol):
    """What scoring code needs of a model: :class:`FusionModel`, or a backend wrapped to look like one.

    ``__call__`` takes batched tensors ``image (B,3,Hi,Wi)``, ``bev (B,C,ny,nx)``, ``ego (B,F)``,
    ``modality_mask (B,3)`` and returns the outputs keyed by :data:`OUTPUT_NAMES`.
    """

    def eval(self) -> object: ...

    def __call__(
        self, image: torch.Tensor, bev: torch.Tensor, ego: torch.Tensor, modality_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


#: Additive attention bias for masked keys; finite so FP16 engines do not produce inf - inf.
MASK_BIAS = -1.0e4


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, d)`` with an additive key bias ``(B, 1, 1, T)``."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h = n_heads
        self.dh = d // n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, T, dh)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dh)) + key_bias
        att = torch.softmax(att, dim=-1)  # (B, h, T, T)
        y = torch.matmul(self.drop(att), v).transpose(1, 2).reshape(b, t, d)
        return self.out(y), att


class FusionLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, cfg.ff_mult * d), nn.GELU(), nn.Linear(cfg.ff_mult * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, att = self.attn(self.norm1(x), key_bias)
        x = x + self.drop(y)
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, att


class CameraPool(nn.Module):
    """Attention pooling of camera tokens ``(B, N, d)`` -> ``(B, d)``: each of ``heads`` learned scores
    picks its own tokens (a softmax over the N tokens), the pooled vectors are mixed by a linear layer."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.score = nn.Linear(d, heads)
        self.mix = nn.Linear(heads * d, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.score(tokens), dim=1)  # (B, N, heads)
        pooled = torch.matmul(w.transpose(1, 2), tokens)  # (B, heads, d)
        return self.mix(pooled.reshape(tokens.shape[0], -1))


class FusionModel(nn.Module):
    """Camera + LiDAR + ego fusion model.

    ``forward(image (B,3,Hi,Wi), bev (B,C,ny,nx), ego (B,F), modality_mask (B,3) float, 1 = present)``
    returns a dict keyed by :data:`OUTPUT_NAMES`:
    ``risk_logits (B,3)``, ``action_logits (B,6)``, ``light_logits (B,4)``, ``target_speed (B,)`` [m/s],
    ``ttc (B,)`` [s, ``cfg.ttc_max`` = none], ``obstacle_distance (B,)`` [m, ``cfg.distance_max`` = free],
    ``occupancy_logits (B, ny, nx)`` on the occupancy grid, ``modality_attention (B,3)`` (shares of the
    query attention per modality; sum 1 over present modalities, 0 for masked ones, all 0 when none).

    A masked modality's tokens are excluded from every key set and its skip paths (the BEV features
    of the occupancy head, the ego vector and the pooled camera vector of the decision heads) are
    multiplied by the mask, so changing a masked modality's input does not change any output.
    """

    token_modality: torch.Tensor  # (T,) buffer: modality index per token (0 camera, 1 lidar, 2 gnss, 3 query)
    token_onehot: torch.Tensor  # (T, 3) buffer: one-hot of token_modality without the query column

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.camera = CameraEncoder(cfg)
        self.lidar = BevEncoder(cfg)
        self.gnss = EgoEncoder(cfg)
        hc, wc = cfg.camera_token_shape
        hb, wb = cfg.bev_token_shape
        self.n_cam, self.n_bev, self.n_ego, self.n_q = hc * wc, hb * wb, cfg.ego_tokens, cfg.n_queries
        n_tokens = self.n_q + self.n_cam + self.n_bev + self.n_ego
        # Token -> modality index (0 camera, 1 lidar, 2 gnss, 3 query): static gather indices.
        token_modality = torch.cat([
            torch.full((self.n_q,), 3), torch.full((self.n_cam,), 0),
            torch.full((self.n_bev,), 1), torch.full((self.n_ego,), 2),
        ]).long()
        self.register_buffer("token_modality", token_modality, persistent=False)
        # (T, 3) one-hot used to sum attention per modality (queries map to no modality).
        onehot = F.one_hot(token_modality, 4)[:, :3].float()
        self.register_buffer("token_onehot", onehot, persistent=False)
        self.queries = nn.Parameter(torch.randn(1, self.n_q, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, d) * 0.02)
        self.modality_embed = nn.Parameter(torch.randn(4, d) * 0.02)
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        # Ego motion also reaches the heads directly (gated by the GNSS mask): every decision
        # threshold of the task scales with ego speed, and 2 ego tokens among ~150 get little attention.
        self.ego_skip = nn.Linear(self.n_ego * d, d)
        self.camera_pool = CameraPool(d, cfg.camera_pool_heads) if cfg.camera_pool_heads else None
        self.heads = Heads(cfg, self.n_q * d + d + (d if self.camera_pool is not None else 0))
        self.occupancy = OccupancyHead(cfg, (hb, wb))
        # Per-modality embeddings for the InfoNCE alignment loss (training only).
        self.align = nn.ModuleList(nn.Linear(d, d) for _ in MODALITIES)

    def forward(self, image: torch.Tensor, bev: torch.Tensor, ego: torch.Tensor,
                modality_mask: torch.Tensor, with_embeddings: bool = False) -> dict[str, torch.Tensor]:
        b = image.shape[0]
        mask = modality_mask.to(image.dtype)
        cam_tok = self.camera(image)
        bev_tok, bev_skip = self.lidar(bev)
        ego_tok = self.gnss(ego)
        tokens = [cam_tok, bev_tok, ego_tok]
        x = torch.cat([self.queries.expand(b, -1, -1), *tokens], dim=1)
        x = x + self.pos + self.modality_embed[self.token_modality]
        # Key validity per token: the mask of its modality, queries always valid.
        valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)[:, self.token_modality]  # (B, T)
        key_bias = ((1.0 - valid) * MASK_BIAS)[:, None, None, :]
        att = key_bias  # replaced by the last layer's attention
        for layer in self.layers:
            x, att = layer(x, key_bias)
        x = self.norm(x)
        # Attention of the queries in the last layer, averaged over heads and queries: (B, T).
        q_att = att[:, :, : self.n_q, :].mean(dim=(1, 2))
        per_mod = torch.matmul(q_att, self.token_onehot) * mask  # (B, 3)
        shares = per_mod / per_mod.sum(dim=1, keepdim=True).clamp_min(1e-6)

        direct = [self.ego_skip(ego_tok.reshape(b, -1)) * mask[:, 2:3]]
        if self.camera_pool is not None:
            direct.append(self.camera_pool(cam_tok) * mask[:, 0:1])
        fused = torch.cat([x[:, : self.n_q].reshape(b, -1), *direct], dim=1)
        out, trunk = self.heads(fused)
        start = self.n_q + self.n_cam
        bev_fused = x[:, start: start + self.n_bev]
        lidar_on = mask[:, 1:2, None, None]
        out["occupancy_logits"] = self.occupancy(trunk, bev_skip * lidar_on,
                                                 bev_fused * lidar_on[:, :, 0])
        out["modality_attention"] = shares
        if with_embeddings:
            pooled = [t.mean(dim=1) for t in tokens]
            out["embeddings"] = torch.stack([F.normalize(p(e), dim=-1) for p, e in zip(self.align, pooled)],
                                            dim=1)  # (B, 3, d), unit length
        return out


class TupleOutputs(nn.Module):
    """``FusionModel`` with outputs as a tuple in :data:`OUTPUT_NAMES` order (for ONNX export/tracing).

    Always in eval mode: exporting a module in training mode would run BatchNorm with batch
    statistics and update its running stats.
    """

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def train(self, mode: bool = True) -> TupleOutputs:
        return super().train(False)

    def forward(self, image: torch.Tensor, bev: torch.Tensor, ego: torch.Tensor,
                modality_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, bev, ego, modality_mask)
        return tuple(out[k] for k in OUTPUT_NAMES)
