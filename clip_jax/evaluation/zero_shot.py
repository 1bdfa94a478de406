"""Zero-shot classification: class embeddings from prompt templates (ensembled as in the CLIP
paper) and top-1 / top-5 / mean per-class recall of images scored against them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from clip_jax.evaluation.features import DEFAULT_BATCH_SIZE, Encoder, encode_prompts, extract_image_features
from clip_jax.evaluation.templates import Template, check_template, fill_template
from clip_jax.models import CLIP

TOP_K: tuple[int, ...] = (1, 5)


def class_embeddings(
    encoder: Encoder, tokenizer: Callable, class_names: Sequence[str], templates: Sequence[Template]
) -> np.ndarray:
    """(num_classes, embed_dim) float32: per class, every template's prompt embedded and L2-normalised,
    the mean taken over templates and L2-normalised again (the paper's prompt ensembling)."""
    class_names = list(class_names)
    templates = [check_template(template) for template in templates]
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    # Class-major order: prompts of class c are rows [c * T, (c + 1) * T).
    prompts = [fill_template(template, name) for name in class_names for template in templates]
    embeddings = encode_prompts(encoder, tokenizer, prompts)  # (C * T, D), unit rows
    mean = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def zero_shot_classifier(
    model: CLIP,
    variables: dict[str, Any],
    tokenizer: Callable,
    class_names: Sequence[str],
    templates: Sequence[Template],
    *,
    encoder: Encoder | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """The class-embedding matrix (num_classes, embed_dim) of `class_names` under `templates`
    (strings with one "{}" or functions of the class name); the texts are embedded over every
    device. `encoder` reuses an existing `Encoder` of this model (its compiled towers and mesh)."""
    encoder = encoder or Encoder(model, variables, batch_size=batch_size)
    return class_embeddings(encoder, tokenizer, class_names, templates)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, class_subset: Sequence[int] | None = None, top_k: Sequence[int] = TOP_K
) -> dict[str, float]:
    """top-k accuracies and the mean per-class recall of scores (n, num_classes) against labels.

    `class_subset` (label ids) restricts the prediction to those classes (ImageNet-R and -A are
    scored among their 200 classes); labels stay in the full label space and must lie in it.
    The mean per-class recall averages top-1 recall over the classes that occur in `labels`.
    """
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (n, classes) and labels (n,), got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels range over [{labels.min()}, {labels.max()}], outside the {logits.shape[1]} classes")
    candidates = np.arange(logits.shape[1]) if class_subset is None else np.asarray(sorted(set(class_subset)))
    if class_subset is not None:
        outside = sorted(set(labels.tolist()) - set(candidates.tolist()))
        if outside:
            raise ValueError(f"labels {outside[:10]} are not in class_subset")
    scores = logits[:, candidates]
    # Descending order; a stable sort ranks tied classes by label id, so results are deterministic.
    ranking = candidates[np.argsort(-scores, axis=1, kind="stable")]
    results: dict[str, float] = {}
    for k in top_k:
        if k <= len(candidates):
            results[f"top{k}"] = float(np.mean(np.any(ranking[:, :k] == labels[:, None], axis=1)))
    predicted = ranking[:, 0]
    present = np.unique(labels)
    results["mean_per_class_recall"] = float(np.mean([np.mean(predicted[labels == c] == c) for c in present]))
    results["num_examples"] = int(len(labels))
    results["num_classes"] = int(len(candidates))
    return results


def zero_shot_predict(image_features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Cosine similarities (n, num_classes) of unit image features (n, D) with class embeddings (C, D)."""
    image_features = np.asarray(image_features, np.float32)
    classifier = np.asarray(classifier, np.float32)
    if image_features.shape[-1] != classifier.shape[-1]:
        raise ValueError(f"image features {image_features.shape} and classifier {classifier.shape} differ in width")
    return image_features @ classifier.T


def zero_shot_evaluate(
    model: CLIP,
    variables: dict[str, Any],
    tokenizer: Callable,
    batches: Iterable[dict[str, Any]],
    class_names: Sequence[str],
    templates: Sequence[Template],
    *,
    class_subset: Sequence[int] | None = None,
    preprocess: Callable | None = None,
    encoder: Encoder | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Zero-shot top-1, top-5 and mean per-class recall on a stream of {"images", "labels"} batches.

    Images may be uint8 arrays, preprocessed float arrays or lists of PIL images / paths
    (`preprocess` is then the model's evaluation transform). Labels index `class_names`.
    """
    encoder = encoder or Encoder(model, variables, batch_size=batch_size)
    classifier = class_embeddings(encoder, tokenizer, class_names, templates)
    features, labels = extract_image_features(encoder, batches, preprocess, max_examples=max_examples)
    return classification_metrics(zero_shot_predict(features, classifier), labels, class_subset)
