"""clip_jax: CLIP in JAX/Flax — models, tokenizers, weight conversion, training and evaluation."""

from clip_jax.api import encode_images, encode_texts, load, zero_shot_classify
from clip_jax.captioning import generate_captions
from clip_jax.models import CLIP, CLIPConfig, available_models, create_model, get_model_config
from clip_jax.tokenizer import ClipTokenizer, SentencePieceTokenizer, get_tokenizer

__all__ = [
    "CLIP",
    "CLIPConfig",
    "ClipTokenizer",
    "SentencePieceTokenizer",
    "available_models",
    "create_model",
    "encode_images",
    "encode_texts",
    "generate_captions",
    "get_model_config",
    "get_tokenizer",
    "load",
    "zero_shot_classify",
]
__version__ = "0.1.0"
