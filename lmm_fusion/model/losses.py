"""Training losses: classification, capped regressions, occupancy, cautious risk and InfoNCE alignment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmm_fusion.model.config import ModelConfig


@dataclass
class LossWeights:
    risk: float = 1.0
    action: float = 1.0
    light: float = 0.5
    target_speed: float = 1.0
    ttc: float = 0.5
    distance: float = 0.5
    occupancy: float = 1.0
    cautious: float = 0.5  # probability mass on risk levels below the true one
    cautious_degraded: float = 1.0  # extra cautious weight on samples that miss a sensor (1 = double)
    align: float = 0.1  # InfoNCE between modality embeddings of the same moment
    align_temperature: float = 0.1
    focal_gamma: float = 2.0
    occupancy_pos_weight: float = 0.75  # focal alpha for occupied cells (they are rare)


def focal_bce(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Mean binary focal loss (Lin et al.) over all cells; ``alpha`` weights positives."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t).pow(gamma) * bce).mean()


def info_nce(emb: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between every pair of modality embeddings.

    ``emb (B, M, d)`` unit vectors, ``present (B, M)`` bool: only samples where both modalities of a
    pair really exist take part (a zero input's embedding is not a view of the scene). The positive of
    sample i's modality a is sample i's modality b; the other samples of the batch are negatives.
    """
    total = emb.new_zeros(())
    pairs = 0
    m = emb.shape[1]
    for a in range(m):
        for b in range(a + 1, m):
            both = present[:, a] & present[:, b]
            if int(both.sum()) < 2:
                continue
            ea, eb = emb[both, a], emb[both, b]
            logits = ea @ eb.T / temperature
            labels = torch.arange(ea.shape[0], device=emb.device)
            total = total + 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            pairs += 1
    return total / max(pairs, 1)


class FusionLoss(nn.Module):
    """Weighted sum of the per-head losses; ``forward`` returns ``(total, {name: value})``.

    ``targets``: ``risk``/``action``/``light`` int64 (B,), ``target_speed`` [m/s], ``ttc`` [s],
    ``distance`` [m] float (B,) already capped at the config's maxima, ``occupancy`` (B, ny, nx) 0/1.
    Regressions are compared after dividing by their caps so all are O(1).
    ``data_mask (B, 3)``: which modalities truly exist (for the alignment loss);
    ``used_mask (B, 3)``: the mask the model saw (after modality dropout); degraded samples weigh
    the cautious-risk term ``1 + cautious_degraded`` times, so a model missing a sensor leans
    towards higher risk.
    """

    def __init__(self, cfg: ModelConfig, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.w = weights or LossWeights()

    def forward(self, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                data_mask: torch.Tensor | None = None, used_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        w, cfg = self.w, self.cfg
        parts: dict[str, torch.Tensor] = {}
        parts["risk"] = F.cross_entropy(out["risk_logits"].float(), targets["risk"])
        parts["action"] = F.cross_entropy(out["action_logits"].float(), targets["action"])
        parts["light"] = F.cross_entropy(out["light_logits"].float(), targets["light"])
        parts["target_speed"] = F.smooth_l1_loss(out["target_speed"].float() / cfg.speed_max,
                                                 targets["target_speed"] / cfg.speed_max, beta=0.05)
        parts["ttc"] = F.smooth_l1_loss(out["ttc"].float() / cfg.ttc_max,
                                        targets["ttc"].clamp(0, cfg.ttc_max) / cfg.ttc_max, beta=0.05)
        parts["distance"] = F.smooth_l1_loss(out["obstacle_distance"].float() / cfg.distance_max,
                                             targets["distance"].clamp(0, cfg.distance_max) / cfg.distance_max,
                                             beta=0.05)
        parts["occupancy"] = focal_bce(out["occupancy_logits"].float(), targets["occupancy"],
                                       w.focal_gamma, w.occupancy_pos_weight) * 10.0
        # Cautious risk: penalise probability on levels *below* the true one.
        p = torch.softmax(out["risk_logits"].float(), dim=-1)
        levels = torch.arange(p.shape[1], device=p.device)
        under = (p * (levels[None, :] < targets["risk"][:, None]).float()).sum(1)
        degraded = (1.0 + w.cautious_degraded * (used_mask.sum(1) < 3).float() if used_mask is not None
                    else torch.ones_like(under))
        parts["cautious"] = (under * degraded).mean()
        if "embeddings" in out and data_mask is not None and w.align > 0:
            parts["align"] = info_nce(out["embeddings"].float(), data_mask > 0.5, w.align_temperature)
        total = sum(getattr(w, k) * v for k, v in parts.items())
        assert isinstance(total, torch.Tensor)
        return total, {k: float(v.detach()) for k, v in parts.items()}
