"""V-JEPA model: encoder (VisionTransformer), Predictor, and the VJEPA wrapper that computes the loss.

Feature extraction and export for users live in `model.features`.
"""

from model.config import VIT_SIZES, ModelConfig
from model.predictor import Predictor
from model.vit import VisionTransformer
from model.vjepa import VJEPA

__all__ = ["VIT_SIZES", "ModelConfig", "Predictor", "VisionTransformer", "VJEPA"]
