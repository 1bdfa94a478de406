"""Zero-shot classification: class embeddings from prompt templates (ensembled as in the CLIP
paper) and top-1 / top-5 / mean per-class recall of images scored against them.

`zero_shot_scores` scores images against classes under each training objective: contrastive
(cosine similarity to the class embedding), caption (CapPa: the decoder's log-likelihood of the
class prompts given the image) and bag of words (the head's mean log-probability of the prompt's
words)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import captioning, losses
from clip_jax.data.templates import Template, check_template, fill_template
from clip_jax.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    Encoder,
    _tokenize,
    encode_prompts,
    extract_image_features,
)
from clip_jax.models import CLIP

TOP_K: tuple[int, ...] = (1, 5)
# Zero-shot scores with the head of one term of a training objective (losses.TERMS, in the order
# "auto" prefers them); each objective's record names its own (losses.Objective.zero_shot).
OBJECTIVES: tuple[str, ...] = losses.TERMS
# Decoder passes (image, prompt pairs) per call of the caption scorer: bounds its memory.
DEFAULT_PAIR_BATCH_SIZE = 1024


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


# ------------------------------------------------------------------------------------------------
# Scores under every objective.
# ------------------------------------------------------------------------------------------------


def check_objective(model: CLIP, objective: str) -> str:
    """`objective` if `model` has the head it scores with; one clear error otherwise."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown zero-shot objective {objective!r}; expected one of {OBJECTIVES}")
    for need in losses.TERM_NEEDS[objective]:
        if not need.met_by(model.config):
            value = getattr(model.config, need.field, None)
            raise ValueError(
                f"zero-shot objective {objective!r} needs {need.what}; the model's config.{need.field} is {value!r}"
            )
    return objective


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` with zero rows appended up to `size`: every call sees one shape and compiles once."""
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.zeros((size - len(rows), *rows.shape[1:]), rows.dtype)])


def _caption_scores(
    model: CLIP, variables: dict[str, Any], images: np.ndarray, prompts: np.ndarray, pair_batch_size: int
) -> np.ndarray:
    """(N, P) log-likelihoods of every prompt row given every image, in blocks of at most
    `pair_batch_size` (image, prompt) pairs; the image tokens of one block of images at a time."""
    prompt_block = min(len(prompts), pair_batch_size)
    image_block = max(1, min(len(images), pair_batch_size // prompt_block))
    scores = np.zeros((len(images), len(prompts)), np.float32)
    for first in range(0, len(images), image_block):
        chunk = images[first : first + image_block]
        tokens = captioning.encode_image_tokens(model, variables, _padded(chunk, image_block))
        for start in range(0, len(prompts), prompt_block):
            block = prompts[start : start + prompt_block]
            likelihood = captioning.pairwise_caption_log_likelihood(
                model, variables, tokens, _padded(block, prompt_block)
            )
            scores[first : first + len(chunk), start : start + len(block)] = np.asarray(likelihood)[
                : len(chunk), : len(block)
            ]
    return scores


@functools.partial(jax.jit, static_argnames=("model",))
def _word_log_probs(model: CLIP, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    embeds = model.apply(variables, images, method=CLIP.encode_image)  # unnormalised, as the head is trained
    logits = model.apply(variables, embeds, method=CLIP.bag_of_words_logits)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _bag_of_words_scores(model: CLIP, word_log_probs: jax.Array, prompts: jax.Array) -> jax.Array:
    # The prompt's words as the loss weighs them (each distinct word once, weights summing to 1):
    # a score is minus the bag-of-words loss the prompt would have as the image's caption.
    targets = losses.bag_of_words_targets(prompts, model.config.text, model.config.text.vocab_size)  # (P, V)
    return word_log_probs @ targets.T


def _bow_scores(
    model: CLIP, variables: dict[str, Any], images: np.ndarray, prompts: np.ndarray, batch_size: int
) -> np.ndarray:
    """(N, P) mean log-probabilities of each prompt's words under the head, in blocks of
    `batch_size` images and prompts (the (prompts, vocab) targets of one block at a time)."""
    image_block, prompt_block = min(len(images), batch_size), min(len(prompts), batch_size)
    scores = np.zeros((len(images), len(prompts)), np.float32)
    for first in range(0, len(images), image_block):
        chunk = images[first : first + image_block]
        word_log_probs = _word_log_probs(model, variables, _padded(chunk, image_block))
        for start in range(0, len(prompts), prompt_block):
            block = prompts[start : start + prompt_block]
            result = np.asarray(_bag_of_words_scores(model, word_log_probs, _padded(block, prompt_block)))
            scores[first : first + len(chunk), start : start + len(block)] = result[: len(chunk), : len(block)]
    return scores


def zero_shot_scores(
    model: CLIP,
    variables: dict[str, Any],
    tokenizer: Callable,
    images: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[Template],
    objective: str = "contrastive",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pair_batch_size: int = DEFAULT_PAIR_BATCH_SIZE,
    encoder: Encoder | None = None,
) -> np.ndarray:
    """(N, num_classes) float32 scores of preprocessed images (N, H, W, 3) against the classes; the
    highest is the prediction. "contrastive": cosine similarity with the ensembled class embedding
    (`class_embeddings`); "caption": the decoder's log-likelihood of each class's prompts given the
    image, averaged over templates (CapPa); "bag_of_words": the head's mean log-probability of each
    prompt's words, averaged over templates. Caption scoring runs N * classes * templates decoder
    passes, `pair_batch_size` at a time. `encoder` reuses an `Encoder` (contrastive only)."""
    check_objective(model, objective)
    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected preprocessed float images (n, H, W, 3), got {images.dtype} {images.shape}")
    if objective == "contrastive":
        encoder = encoder or Encoder(model, variables, batch_size=batch_size)
        classifier = class_embeddings(encoder, tokenizer, class_names, templates)
        return zero_shot_predict(encoder.encode_images(images), classifier)
    class_names = list(class_names)
    templates = [check_template(template) for template in templates]
    if not class_names or not templates:
        raise ValueError(f"need classes and templates, got {len(class_names)} classes and {len(templates)} templates")
    if pair_batch_size < 1:
        raise ValueError(f"pair_batch_size must be >= 1, got {pair_batch_size}")
    prompts = _tokenize(tokenizer, [fill_template(template, name) for name in class_names for template in templates])
    prompts = prompts.astype(np.int32)
    if len(images) == 0:
        return np.zeros((0, len(class_names)), np.float32)
    if objective == "caption":
        scores = _caption_scores(model, variables, images.astype(np.float32), prompts, pair_batch_size)
    else:
        scores = _bow_scores(model, variables, images.astype(np.float32), prompts, batch_size)
    # Class-major prompts: class c's are columns [c * T, (c + 1) * T).
    return scores.reshape(len(images), len(class_names), len(templates)).mean(axis=2)


def class_probabilities(variables: dict[str, Any], scores: np.ndarray, objective: str) -> np.ndarray:
    """(N, classes) probabilities from `zero_shot_scores`: a softmax of the cosine similarities
    times the model's temperature (clamped at 100, as CLIP does) for "contrastive"; of the scores
    themselves (log-likelihoods) for the other objectives."""
    logits = np.asarray(scores, np.float64)
    if objective == "contrastive":
        logits = logits * min(float(np.exp(np.asarray(variables["params"]["logit_scale"]))), 100.0)
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)
