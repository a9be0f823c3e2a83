"""Save and load a model as ``config.json`` + ``model.safetensors`` (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmm_fusion.model.config import ModelConfig
from lmm_fusion.model.fusion import FusionModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: FusionModel, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32, contiguous) into ``directory``.

    ``metadata`` (JSON-serialisable) is stored in the safetensors header under ``"lmm_fusion"``.
    Returns the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out / CONFIG_FILE)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    meta = {"format": "pt", "lmm_fusion": json.dumps(metadata or {}, sort_keys=True)}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out / WEIGHTS_FILE)  # atomic: a reader never sees half a file
    return out


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in model directory {directory}")
    return ModelConfig.load(path)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> FusionModel:
    """Build a :class:`FusionModel` from ``directory`` and load its weights; returned in eval mode.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` when the weights do not match
    the configuration (missing/unexpected tensor names or shapes).
    """
    cfg = load_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in model directory {directory}")
    model = FusionModel(cfg)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # SafetensorError (truncated/garbage file) names no file itself
        raise ValueError(f"{weights}: not a valid safetensors file ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights in {weights} do not match config: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"weights in {weights}: tensor {k} has shape {tuple(v.shape)}, "
                             f"config expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def model_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``metadata`` dict given to :func:`save_model` (empty when none)."""
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("lmm_fusion", "{}"))
