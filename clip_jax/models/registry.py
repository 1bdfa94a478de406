"""Named specifications: OpenAI's released architectures at their exact hyper-parameters, and tiny ones."""

from __future__ import annotations

from typing import Any

from clip_jax.models.clip import CLIP
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig


def _resnet(embed_dim: int, image_size: int, layers: tuple[int, ...], width: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, width=width, layers=layers, patch_size=None),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=12),
    )


def _vit(embed_dim: int, image_size: int, layers: int, width: int, patch: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, width=width, layers=layers, patch_size=patch),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=12),
    )


# The values of OpenAI's released checkpoints (clip/model.py build_model reads them off the weights).
_MODELS: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _resnet(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _resnet(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _resnet(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _resnet(1024, 448, (3, 15, 36, 10), 128, 1024),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768),
    # Tiny models for tests and CPU runs.
    "tiny-vit": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, width=64, layers=2, heads=2, patch_size=8),
        text=TextConfig(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
    ),
    "tiny-resnet": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=64, width=16, layers=(1, 1, 1, 1), heads=4, patch_size=None),
        text=TextConfig(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
    ),
}


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """The model config called `name`, with fields replaced (`vision=dict(...)`, `text=dict(...)` for the towers)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _MODELS[name].replace(**overrides)


def create_model(name_or_config: str | CLIPConfig, **overrides: Any) -> CLIP:
    """A `CLIP` module for a registered name (e.g. "ViT-B-32", dtype="bfloat16") or a `CLIPConfig`."""
    if isinstance(name_or_config, CLIPConfig):
        config = name_or_config.replace(**overrides)
    else:
        config = get_model_config(name_or_config, **overrides)
    return CLIP(config)
