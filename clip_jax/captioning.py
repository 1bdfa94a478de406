"""Captioning with a CLIP's caption decoder (CoCa, CapPa): scoring captions given images, and
generating them (greedy or beam search), from token ids or from raw images to strings.

A caption is a row as the tokenizer writes it: CLIP BPE rows [SOT, ids..., EOT, 0, ...] (text
pooling "argmax"), SentencePiece rows [ids..., eos, pad, ...] (pooling "last"). `CLIP.decode`
predicts position i of a row from positions [0, i), so every function here works on whole rows:
generated captions come back in the tokenizer's format and can be scored, decoded or embedded.

Generation is one jitted program per (batch size, length, method): a `lax.while_loop` over
positions that reruns the decoder on the whole fixed-length row each step (the decoder is causal,
so the positions not yet generated do not change the logits read), and stops once every row has
ended. Rows end at their end-of-text token and are padded after it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import losses, transforms
from clip_jax.models import CLIP

METHODS: tuple[str, ...] = ("greedy", "beam")
DEFAULT_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class CaptionFormat:
    """How a model's caption rows are laid out: the ids every row starts with, the id that ends a
    caption and the id that pads a row after it."""

    start_ids: tuple[int, ...]
    eot_id: int
    pad_id: int


def caption_format(model: CLIP, eot_id: int | None = None) -> CaptionFormat:
    """The row layout of `model`'s tokenizer, from its text config: CLIP BPE ("argmax" pooling)
    starts rows with SOT = vocab - 2 and ends them with EOT = vocab - 1; SentencePiece ("last")
    has no start token and its end id is the tokenizer's (`eot_id`, required then)."""
    text = model.config.text
    if text.pooling == "argmax":
        expected = text.vocab_size - 1
        if eot_id is not None and eot_id != expected:
            raise ValueError(f"eot_id {eot_id} is not the BPE end-of-text id {expected} (vocab_size - 1)")
        return CaptionFormat((text.vocab_size - 2,), expected, text.pad_id)
    if eot_id is None:
        raise ValueError("a SentencePiece model (text pooling 'last') needs eot_id: the tokenizer's eot_token_id")
    return CaptionFormat((), int(eot_id), text.pad_id)


def check_caption_model(model: CLIP) -> None:
    """One clear error for a model without a caption decoder."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model must be a clip_jax CLIP, got {type(model).__name__}")
    if getattr(model.config, "decoder", None) is None:
        raise ValueError(
            "the model has no caption decoder (config.decoder is None): it cannot caption or score captions"
        )


# ------------------------------------------------------------------------------------------------
# Scoring (CapPa): the log-likelihood of captions given images.
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model",))
def encode_image_tokens(model: CLIP, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    """(B, T, vision width) image tokens the decoder attends to, of preprocessed float images."""
    return model.apply(variables, images, method=CLIP.encode_image_tokens)[1]


def _caption_log_likelihood(model: CLIP, variables: dict[str, Any], tokens: jax.Array, texts: jax.Array) -> jax.Array:
    logits = model.apply(variables, tokens, texts[:, :-1], method=CLIP.decode)  # (B, L, V)
    # Minus the loss the decoder is trained with, token by token, over the same positions.
    weights = losses.caption_targets(texts, model.config.text)
    return -jnp.sum(weights * losses.caption_token_losses(logits, texts), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def caption_log_likelihood(
    model: CLIP, variables: dict[str, Any], image_tokens: jax.Array, texts: jax.Array
) -> jax.Array:
    """(B,) float32: the sum of log p(token | image, earlier tokens) over each row's weighted
    positions (those the caption loss trains, `losses.caption_targets`). `image_tokens` (B, T, W)
    from `encode_image_tokens`, `texts` (B, L) token rows with L <= context_length."""
    return _caption_log_likelihood(model, variables, image_tokens, texts)


@functools.partial(jax.jit, static_argnames=("model",))
def pairwise_caption_log_likelihood(
    model: CLIP, variables: dict[str, Any], image_tokens: jax.Array, texts: jax.Array
) -> jax.Array:
    """(I, P) float32: `caption_log_likelihood` of every text row (P, L) with every image (I, T, W),
    in one batch of I * P decoder passes."""
    count_images, count_texts = image_tokens.shape[0], texts.shape[0]
    tokens = jnp.repeat(image_tokens, count_texts, axis=0)  # image-major: pair (i, p) is row i * P + p
    rows = jnp.tile(texts, (count_images, 1))
    return _caption_log_likelihood(model, variables, tokens, rows).reshape(count_images, count_texts)


# ------------------------------------------------------------------------------------------------
# Generation.
# ------------------------------------------------------------------------------------------------


def _next_log_probs(
    model: CLIP, variables: dict[str, Any], tokens: jax.Array, rows: jax.Array, position: jax.Array, banned: jax.Array
) -> jax.Array:
    """(B, V) float32 log-probabilities of the token at `position` of each row, given the row's
    earlier positions; `banned` (V,) bool ids are never proposed."""
    logits = model.apply(variables, tokens, rows[:, :-1], method=CLIP.decode)  # (B, L, V)
    logits = jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False).astype(jnp.float32)
    return jax.nn.log_softmax(jnp.where(banned, -jnp.inf, logits), axis=-1)


def _initial_rows(batch: int, length: int, layout: CaptionFormat) -> jax.Array:
    rows = jnp.full((batch, length), layout.pad_id, jnp.int32)
    if layout.start_ids:
        rows = rows.at[:, : len(layout.start_ids)].set(jnp.asarray(layout.start_ids, jnp.int32))
    return rows


def _greedy(
    model: CLIP, variables: dict[str, Any], tokens: jax.Array, length: int, layout: CaptionFormat, banned: jax.Array
) -> jax.Array:
    batch = tokens.shape[0]

    def running(state: tuple) -> jax.Array:
        position, _, ended = state
        return (position < length) & ~jnp.all(ended)

    def step(state: tuple) -> tuple:
        position, rows, ended = state
        choice = jnp.argmax(_next_log_probs(model, variables, tokens, rows, position, banned), axis=-1)
        choice = jnp.where(ended, layout.pad_id, choice).astype(jnp.int32)
        rows = jax.lax.dynamic_update_index_in_dim(rows, choice, position, axis=1)
        return position + 1, rows, ended | (choice == layout.eot_id)

    start = (jnp.int32(len(layout.start_ids)), _initial_rows(batch, length, layout), jnp.zeros(batch, bool))
    return jax.lax.while_loop(running, step, start)[1]


def _beam(
    model: CLIP,
    variables: dict[str, Any],
    tokens: jax.Array,
    length: int,
    layout: CaptionFormat,
    banned: jax.Array,
    width: int,
    length_penalty: float,
) -> jax.Array:
    """Beam search over whole rows: an ended beam stays in the beam, continued by padding at no
    cost, so beams are ranked by their log-likelihood throughout; the length penalty only picks
    among the final beams (score / generated_tokens ** length_penalty). Width 1 is greedy search."""
    batch = tokens.shape[0]
    tokens = jnp.repeat(tokens, width, axis=0)  # beam-minor: beam k of image b is row b * width + k
    # Every beam starts as the same row: only the first is live, so the first step picks `width`
    # different tokens instead of one token `width` times.
    scores = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)[None], (batch, 1))
    rows = _initial_rows(batch * width, length, layout).reshape(batch, width, length)
    after_end = jnp.full(banned.shape, -jnp.inf, jnp.float32).at[layout.pad_id].set(0.0)

    def running(state: tuple) -> jax.Array:
        position, _, _, ended, _ = state
        return (position < length) & ~jnp.all(ended)

    def step(state: tuple) -> tuple:
        position, rows, scores, ended, generated = state
        log_probs = _next_log_probs(model, variables, tokens, rows.reshape(batch * width, length), position, banned)
        log_probs = jnp.where(ended[..., None], after_end, log_probs.reshape(batch, width, -1))
        # Each beam's best `width` continuations hold the best `width` overall; taking them per beam
        # first leaves width 1 choosing exactly argmax(log_probs), as greedy search does.
        beam_best, beam_ids = jax.lax.top_k(log_probs, width)  # (B, K, K)
        candidates = (scores[..., None] + beam_best).reshape(batch, width * width)
        scores, chosen = jax.lax.top_k(candidates, width)
        parent, choice = chosen // width, jnp.take_along_axis(beam_ids.reshape(batch, -1), chosen, axis=1)
        rows = jnp.take_along_axis(rows, parent[..., None], axis=1)
        rows = jax.lax.dynamic_update_index_in_dim(rows, choice.astype(jnp.int32), position, axis=2)
        was_ended = jnp.take_along_axis(ended, parent, axis=1)
        generated = jnp.take_along_axis(generated, parent, axis=1) + (~was_ended).astype(jnp.int32)
        return position + 1, rows, scores, was_ended | (choice == layout.eot_id), generated

    start = (jnp.int32(len(layout.start_ids)), rows, scores, jnp.zeros((batch, width), bool))
    _, rows, scores, _, generated = jax.lax.while_loop(running, step, (*start, jnp.zeros((batch, width), jnp.int32)))
    ranked = scores / jnp.maximum(generated, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(ranked, axis=1)
    return jnp.take_along_axis(rows, best[:, None, None], axis=1)[:, 0]


@functools.partial(
    jax.jit, static_argnames=("model", "length", "layout", "method", "beam_width", "length_penalty", "banned_ids")
)
def _generate(
    model: CLIP,
    variables: dict[str, Any],
    images: jax.Array,
    length: int,
    layout: CaptionFormat,
    method: str,
    beam_width: int,
    length_penalty: float,
    banned_ids: tuple[int, ...],
) -> jax.Array:
    tokens = model.apply(variables, images, method=CLIP.encode_image_tokens)[1]
    banned = jnp.zeros(model.config.text.vocab_size, bool)
    if banned_ids:
        banned = banned.at[jnp.asarray(banned_ids)].set(True)
    if method == "greedy":
        return _greedy(model, variables, tokens, length, layout, banned)
    return _beam(model, variables, tokens, length, layout, banned, beam_width, length_penalty)


def generate(
    model: CLIP,
    variables: dict[str, Any],
    images: np.ndarray | jax.Array,
    *,
    max_length: int | None = None,
    method: str = "greedy",
    beam_width: int = 4,
    length_penalty: float = 1.0,
    start_ids: Sequence[int] | None = None,
    eot_id: int | None = None,
    pad_id: int | None = None,
    banned_ids: Sequence[int] = (),
) -> np.ndarray:
    """int32 (B, max_length) caption rows for preprocessed float images (B, H, W, 3).

    Rows are laid out as the model's tokenizer lays them out (`caption_format`: BPE rows start with
    SOT, SentencePiece rows with the first word; `eot_id` is required for the latter); `start_ids`,
    `eot_id` and `pad_id` override the layout. A row ends at its first `eot_id` and is `pad_id`
    after it; a row that reaches `max_length` (default: the context length) without ending is cut.
    "greedy" takes the likeliest token each step; "beam" keeps the `beam_width` likeliest rows and
    returns the best under `length_penalty` (see `_beam`). `banned_ids` are never generated; the
    start ids and, for SentencePiece, the padding id never are either.
    """
    check_caption_model(model)
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r}; expected one of {METHODS}")
    if isinstance(beam_width, bool) or not isinstance(beam_width, (int, np.integer)) or beam_width < 1:
        raise ValueError(f"beam_width must be a positive int, got {beam_width!r}")
    layout = _row_layout(model, start_ids, eot_id, pad_id)
    length = _checked_length(model, layout, max_length)
    vocab = model.config.text.vocab_size
    if method == "beam" and beam_width > vocab:
        raise ValueError(f"beam_width {beam_width} exceeds the vocabulary of {vocab} tokens")
    banned = _never_generated(model, layout, banned_ids)
    images = _checked_images(model, images)
    rows = _generate(
        model, variables, images, length, layout, method, int(beam_width) if method == "beam" else 1,
        float(length_penalty), banned,
    )  # fmt: skip
    return np.asarray(rows)


def _row_layout(model: CLIP, start_ids: Sequence[int] | None, eot_id: int | None, pad_id: int | None) -> CaptionFormat:
    """The tokenizer's row layout (`caption_format`), or the one `start_ids`, `eot_id` and
    `pad_id` override it with."""
    if start_ids is None:
        layout = caption_format(model, eot_id)
    elif eot_id is None:
        raise ValueError("start_ids given without eot_id: pass the id that ends a caption too")
    else:
        layout = CaptionFormat(tuple(int(i) for i in start_ids), int(eot_id), model.config.text.pad_id)
    if pad_id is not None:
        layout = dataclasses.replace(layout, pad_id=int(pad_id))
    return layout


def _checked_length(model: CLIP, layout: CaptionFormat, max_length: int | None) -> int:
    """The row length: `max_length` (default: the context length), longer than the start ids."""
    context = model.config.text.context_length
    length = context if max_length is None else max_length
    if (
        isinstance(length, bool)
        or not isinstance(length, (int, np.integer))
        or not len(layout.start_ids) < length <= context
    ):
        raise ValueError(
            f"max_length must be an int in ({len(layout.start_ids)}, {context}] (after the start ids, within the "
            f"context), got {max_length!r}"
        )
    return int(length)


def _never_generated(model: CLIP, layout: CaptionFormat, banned_ids: Sequence[int]) -> tuple[int, ...]:
    """Sorted ids no step may choose: `banned_ids`, the start ids and SentencePiece's padding."""
    vocab = model.config.text.vocab_size
    banned = set(int(i) for i in banned_ids) | set(layout.start_ids)
    if model.config.text.pooling == "last":
        banned.add(layout.pad_id)  # SentencePiece's padding is no word; BPE pads with id 0, a real token
    outside = sorted(i for i in banned if not 0 <= i < vocab)
    if outside:
        raise ValueError(f"banned ids {outside[:5]} are outside the vocabulary of {vocab} tokens")
    return tuple(sorted(banned))


def _checked_images(model: CLIP, images: np.ndarray | jax.Array) -> jax.Array:
    size = model.config.vision.image_size
    if getattr(images, "ndim", 0) != 4 or tuple(images.shape[1:]) != (size, size, 3):
        shape = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"expected preprocessed images (n, {size}, {size}, 3), got {shape}; see generate_captions")
    return jnp.asarray(images, jnp.float32)


def _tokenizer_format(model: CLIP, tokenizer: Any) -> tuple[int, list[int]]:
    """(eot id, ids the tokenizer cannot decode) of `tokenizer` for `model`'s rows."""
    vocab = model.config.text.vocab_size
    eot_id = int(tokenizer.eot_token_id)
    tokenizer_vocab = int(getattr(tokenizer, "vocab_size", vocab))
    if tokenizer_vocab > vocab:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's vocab_size {vocab}")
    # A model whose vocabulary was rounded up past the tokenizer's: those ids have no text.
    return eot_id, list(range(tokenizer_vocab, vocab))


def generate_captions(
    model: CLIP,
    variables: dict[str, Any],
    images: Any,
    tokenizer: Any,
    method: str = "greedy",
    *,
    preprocess: Callable | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    beam_width: int = 4,
    length_penalty: float = 1.0,
) -> list[str]:
    """One caption (a string) per image.

    `images`: a PIL image, a path, a uint8 array (H, W, 3), or a list of them, or a batch array
    (n, H, W, 3), uint8 of any size or float32 already preprocessed at the model's size (as
    `clip_jax.encode_images` takes them); `preprocess` defaults to the model's evaluation transform.
    Batches of `batch_size` images (the last one padded) so the search compiles once.

        model, variables, preprocess, tokenizer = clip_jax.load(path)
        captions = clip_jax.generate_captions(model, variables, images, tokenizer)
    """
    check_caption_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch = transforms.preprocess_images(transforms.as_image_batch(images), model.config.vision.image_size, preprocess)
    eot_id, undecodable = _tokenizer_format(model, tokenizer)
    captions: list[str] = []
    size = min(batch_size, len(batch))
    for start in range(0, len(batch), size):
        chunk = batch[start : start + size]
        rows = len(chunk)
        if rows < size:
            chunk = np.concatenate([chunk, np.zeros((size - rows, *chunk.shape[1:]), chunk.dtype)])
        ids = generate(
            model, variables, chunk, max_length=max_length, method=method, beam_width=beam_width,
            length_penalty=length_penalty, eot_id=eot_id, banned_ids=undecodable,
        )  # fmt: skip
        captions.extend(tokenizer.decode(row) for row in ids[:rows])
    return captions
