"""The fusion model: per-modality encoders, attention fusion, heads; config and save/load."""

from lmm_fusion.model.checkpoint import load_model, save_model
from lmm_fusion.model.config import ModelConfig
from lmm_fusion.model.fusion import INPUT_NAMES, OUTPUT_NAMES, FusionForward, FusionModel, TupleOutputs

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "FusionForward",
    "FusionModel",
    "ModelConfig",
    "TupleOutputs",
    "load_model",
    "save_model",
]
