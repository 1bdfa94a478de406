"""Image-text retrieval: recall@k in both directions when each image has one or several captions
(COCO has 5), computed in row chunks split over the devices."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import sharding, transforms
from clip_jax.data import tfds as tfds_source
from clip_jax.data.classification import EVAL_IMAGE_LIMITS
from clip_jax.data.decode import decode_image
from clip_jax.data.sources import SkippedExample
from clip_jax.evaluation.features import (
    Encoder,
    default_mesh,
    encode_prompts,
    preprocess_images,
    rebatch,
)

RECALL_AT: tuple[int, ...] = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1024

# Ties count against the query: a wrong item that scores exactly as high as the right one is ranked
# ahead of it. A collapsed model (all embeddings equal) then scores 0, not a perfect recall.


@jax.jit
def _text_to_image_ranks(text_chunk: jax.Array, correct_image: jax.Array, images: jax.Array) -> jax.Array:
    """Per caption (chunk rows): how many other images score >= its own image.
    text_chunk (c, D), correct_image (c,), images (N, D) -> (c,) int32."""
    scores = jnp.matmul(text_chunk, images.T, precision=jax.lax.Precision.HIGHEST)  # (c, N)
    correct = jnp.take_along_axis(scores, correct_image[:, None], axis=1)  # (c, 1)
    is_other = jnp.arange(images.shape[0])[None, :] != correct_image[:, None]
    return jnp.sum(is_other & (scores >= correct), axis=1, dtype=jnp.int32)


@jax.jit
def _image_to_text_ranks(
    image_chunk: jax.Array, chunk_image_ids: jax.Array, texts: jax.Array, text_to_image: jax.Array
) -> jax.Array:
    """Per image (chunk rows): how many captions of other images score >= its best caption.
    image_chunk (c, D), chunk_image_ids (c,), texts (M, D), text_to_image (M,) -> (c,) int32."""
    scores = jnp.matmul(image_chunk, texts.T, precision=jax.lax.Precision.HIGHEST)  # (c, M)
    is_own = text_to_image[None, :] == chunk_image_ids[:, None]  # (c, M)
    best_own = jnp.max(jnp.where(is_own, scores, -jnp.inf), axis=1, keepdims=True)  # (c, 1)
    return jnp.sum(~is_own & (scores >= best_own), axis=1, dtype=jnp.int32)


def _chunked_ranks(
    rank_fn: Callable,
    queries: np.ndarray,
    query_extras: Sequence[np.ndarray],
    replicated_args: Sequence[np.ndarray],
    mesh: Mesh,
    chunk_size: int,
) -> np.ndarray:
    """Runs `rank_fn(query_chunk, *chunk_extras, *replicated_args)` over row chunks of `queries`,
    each chunk split over the mesh's batch axes (padded to a multiple of them)."""
    rows_sharding = sharding.batch_sharding(mesh)
    everywhere = NamedSharding(mesh, P())
    shards = sharding.batch_axis_size(mesh)
    chunk_size = int(math.ceil(chunk_size / shards) * shards)
    replicated = [jax.device_put(arg, everywhere) for arg in replicated_args]
    ranks = []
    for start in range(0, len(queries), chunk_size):
        pieces = [queries[start : start + chunk_size]] + [extra[start : start + chunk_size] for extra in query_extras]
        rows = len(pieces[0])
        padded = [np.concatenate([p, np.zeros((chunk_size - rows, *p.shape[1:]), p.dtype)]) for p in pieces]
        placed = [jax.make_array_from_callback(p.shape, rows_sharding, lambda index, p=p: p[index]) for p in padded]
        result = rank_fn(*placed, *replicated)
        ranks.append(np.asarray(jax.device_get(result) if result.is_fully_addressable else _gather(result))[:rows])
    return np.concatenate(ranks)


def _gather(array: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def retrieval_ranks(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    *,
    mesh: Mesh | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks (N,), text->image ranks (M,)): the 0-based rank of the first correct item
    for each query, ties counted against it. Scores are dot products (pass unit-norm features)."""
    image_features = np.asarray(image_features, np.float32)
    text_features = np.asarray(text_features, np.float32)
    text_to_image = np.asarray(text_to_image)
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"expected features (N, D) and (M, D), got {image_features.shape} and {text_features.shape}")
    if text_to_image.shape != (len(text_features),) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(
            f"text_to_image must be {len(text_features)} integer image ids, got {text_to_image.shape} {text_to_image.dtype}"
        )
    num_images = len(image_features)
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(
            f"text_to_image ranges over [{text_to_image.min()}, {text_to_image.max()}], not [0, {num_images})"
        )
    without_caption = np.setdiff1d(np.arange(num_images), text_to_image)
    if len(without_caption):
        raise ValueError(f"images {without_caption[:10].tolist()} have no caption")
    mesh = mesh or default_mesh()
    text_to_image = text_to_image.astype(np.int32)
    image_ids = np.arange(num_images, dtype=np.int32)
    image_ranks = _chunked_ranks(
        _image_to_text_ranks, image_features, [image_ids], [text_features, text_to_image], mesh, chunk_size
    )
    text_ranks = _chunked_ranks(
        _text_to_image_ranks, text_features, [text_to_image], [image_features], mesh, chunk_size
    )
    return image_ranks, text_ranks


def retrieval_evaluate(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    recall_at: Sequence[int] = RECALL_AT,
    *,
    mesh: Mesh | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@k in both directions. `text_to_image[j]` is the image of caption j; every image needs
    at least one caption. image->text: a hit when any of the image's captions is among the top k
    captions; text->image: a hit when the caption's image is among the top k images."""
    image_ranks, text_ranks = retrieval_ranks(
        image_features, text_features, text_to_image, mesh=mesh, chunk_size=chunk_size
    )
    results: dict[str, float] = {}
    for k in recall_at:
        if k < 1:
            raise ValueError(f"recall@k needs k >= 1, got {k}")
        results[f"image_to_text_R@{k}"] = float(np.mean(image_ranks < k))
        results[f"text_to_image_R@{k}"] = float(np.mean(text_ranks < k))
    results["num_images"] = int(len(image_ranks))
    results["num_texts"] = int(len(text_ranks))
    return results


def retrieval_evaluate_model(
    encoder: Encoder,
    tokenizer: Callable,
    batches: Iterable[dict[str, Any]],
    preprocess: Callable | None = None,
    max_images: int | None = None,
    recall_at: Sequence[int] = RECALL_AT,
) -> dict[str, float]:
    """Recall@k of a model on a stream of batches {"images": ..., "captions": one list of strings
    (or one string) per image}: the images and every caption embedded, then `retrieval_evaluate`."""
    image_features, text_features, text_to_image = [], [], []
    num_images = 0
    for batch in rebatch(batches, encoder.batch_size, ["images", "captions"]):
        images, captions = batch["images"], list(batch["captions"])
        if max_images is not None:
            images, captions = images[: max_images - num_images], captions[: max_images - num_images]
        per_image = [[c] if isinstance(c, str) else list(c) for c in captions]
        image_features.append(encoder.encode_images(preprocess_images(images, encoder.image_size, preprocess)))
        texts = [text for group in per_image for text in group]
        text_features.append(encode_prompts(encoder, tokenizer, texts))
        text_to_image.append(np.repeat(np.arange(num_images, num_images + len(per_image)), [len(g) for g in per_image]))
        num_images += len(per_image)
        if max_images is not None and num_images >= max_images:
            break
    if not image_features:
        raise ValueError("the dataset yielded no examples")
    return retrieval_evaluate(
        np.concatenate(image_features),
        np.concatenate(text_features),
        np.concatenate(text_to_image).astype(np.int64),
        recall_at,
        mesh=encoder.mesh,
    )


def _caption_texts(value: Any) -> list[str]:
    """Every non-empty caption of a TFDS record's text feature (a string, bytes, or an array)."""
    values = np.asarray(value, dtype=object).reshape(-1)
    texts = []
    for item in values:
        text = bytes(item).decode("utf-8", errors="replace") if isinstance(item, (bytes, np.bytes_)) else str(item)
        if text.strip():
            texts.append(text.strip())
    return texts


def tfds_caption_batches(
    name: str,
    split: str,
    image_size: int,
    batch_size: int,
    data_dir: str | None = None,
    image_key: str = "image",
    text_key: str = "",
    max_images: int | None = None,
) -> Iterator[dict[str, Any]]:
    """{"images": float32 eval-transformed, "captions": list of caption lists} batches of a prepared
    TFDS image-text split (e.g. coco_captions "test", 5 captions per image), in dataset order.
    Every process reads the whole split. Images that cannot be decoded or have no caption are
    skipped."""
    builder = tfds_source.make_builder(name, data_dir)
    keys = tfds_source.feature_keys(builder, image_key, text_key, "tfds", needs_text=True)
    import tensorflow_datasets as tfds

    records = tfds.as_numpy(
        tfds_source.load_tf_data(name, split, data_dir, keys.decoders, shuffle_files=False, shuffle_seed=None)
    )
    images, captions, produced = [], [], 0
    for record in records:
        if max_images is not None and produced >= max_images:
            break
        texts = _caption_texts(tfds_source.lookup(record, keys.text))
        if not texts:
            continue
        try:
            image, _ = decode_image(tfds_source.lookup(record, keys.image), EVAL_IMAGE_LIMITS)
        except SkippedExample:
            continue
        images.append(transforms.eval_transform(image, image_size))
        captions.append(texts)
        produced += 1
        if len(images) == batch_size:
            yield {"images": np.stack(images), "captions": captions}
            images, captions = [], []
    if images:
        yield {"images": np.stack(images), "captions": captions}
