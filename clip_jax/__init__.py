"""clip_jax: CLIP in JAX/Flax — models, tokenizers, weight conversion, training and evaluation."""

from clip_jax.models import CLIP, CLIPConfig, available_models, create_model, get_model_config

__all__ = ["CLIP", "CLIPConfig", "available_models", "create_model", "get_model_config"]
__version__ = "0.1.0"
