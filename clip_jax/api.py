"""Notebook helpers over `clip_jax.load`'s outputs: embeddings of images (PIL, numpy or paths) and
texts, and zero-shot classification in one call; batches are split over every available device."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image

from clip_jax.evaluation.features import Encoder, encode_prompts, preprocess_images
from clip_jax.evaluation.templates import Template
from clip_jax.evaluation.zero_shot import class_embeddings
from clip_jax.models import CLIP

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _as_image_batch(images: Any) -> Any:
    """One image (PIL, path, (H, W[, C]) uint8 array) becomes a batch of one; batches pass through."""
    if isinstance(images, (PIL.Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    return images


def encode_images(
    model: CLIP,
    variables: dict[str, Any],
    images: Any,
    preprocess: Callable | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Unit-norm image embeddings, float32 (n, embed_dim).

    `images`: a PIL image, a path, a uint8 array (H, W, 3), or a list of them, or a batch array
    (n, H, W, 3) — uint8 of any size, or float32 already preprocessed at the model's size.
    `preprocess` defaults to the model's evaluation transform (what `clip_jax.load` returns).
    """
    encoder = Encoder(model, variables, batch_size=batch_size)
    batch = preprocess_images(_as_image_batch(images), encoder.image_size, preprocess)
    return encoder.encode_images(batch)


def encode_texts(
    model: CLIP, variables: dict[str, Any], tokenizer: Callable, texts: str | Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Unit-norm text embeddings, float32 (n, embed_dim); a single string gives one row.
    Texts longer than the context are truncated."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return encode_prompts(Encoder(model, variables, batch_size=batch_size), tokenizer, texts)


def _logit_scale(variables: dict[str, Any]) -> float:
    # CLIP clamps the learned temperature at 100.
    return float(min(np.exp(np.asarray(variables["params"]["logit_scale"])), 100.0))


def zero_shot_classify(
    model: CLIP,
    variables: dict[str, Any],
    preprocess: Callable | None,
    tokenizer: Callable,
    images: Any,
    class_names: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> np.ndarray:
    """Class probabilities (n, len(class_names)): softmax over the model's scaled cosine
    similarities between each image and each class's ensembled prompt embedding.

        model, variables, preprocess, tokenizer = clip_jax.load(path)
        probabilities = clip_jax.zero_shot_classify(model, variables, preprocess, tokenizer,
                                                    images, ["cat", "dog"])
    """
    encoder = Encoder(model, variables, batch_size=batch_size)
    classifier = class_embeddings(encoder, tokenizer, class_names, templates)  # (classes, D)
    features = encoder.encode_images(preprocess_images(_as_image_batch(images), encoder.image_size, preprocess))
    logits = _logit_scale(variables) * (features @ classifier.T)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)
