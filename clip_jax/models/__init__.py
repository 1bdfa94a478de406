"""Flax modules of CLIP and the registry of named specifications."""

from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.registry import available_models, create_model, get_model_config

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "available_models",
    "create_model",
    "get_model_config",
    "l2_normalize",
]
