"""The fusion model: per-modality encoders, attention fusion, heads; config and save/load."""

from lmm_fusion.model.config import ModelConfig
from lmm_fusion.model.fusion import INPUT_NAMES, OUTPUT_NAMES, FusionModel, TupleOutputs
from lmm_fusion.model.io import load_model, save_model

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "FusionModel", "ModelConfig", "TupleOutputs", "load_model", "save_model"]
