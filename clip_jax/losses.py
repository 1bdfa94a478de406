"""Contrastive losses of CLIP (softmax) and SigLIP (sigmoid): single-device references, and
sharded versions that run inside `jax.shard_map` and see the global batch across devices.

Also the per-example captioning objectives the CLIP paper compares against (§2.3, Fig. 2) and that
CoCa / CapPa train with: the caption's tokens predicted by a decoder (`caption_loss`) and its bag of
words predicted from the pooled image embedding (`bag_of_words_loss`). These need no other example,
so the trainer sums them over its rows and divides by the global batch's count (training/step.py).

What `loss.name` may be is an `Objective` of `OBJECTIVES`, one record each: the terms it sums and
their weights, what it needs of the model, and how zero-shot classification scores under it. Config
validation, the training step, the evaluation suite and the experiments read that record, so a new
objective is one record here (and its loss function, if new)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.collectives import gather, ring_pass
from clip_jax.models.text import end_of_text_index

LOSSES = ("softmax", "sigmoid")  # the contrastive losses
IMPLEMENTATIONS = ("all_gather", "ring")

AxisNames = str | tuple[str, ...]

# A logit scale near 100 magnifies the rounding of the dot products: the default float32 matmul on
# TPU (bf16 passes) errs by about 1e-3 per product, i.e. 0.1 in a logit. The loss matmuls are tiny
# next to the encoders, so they are done in full float32.
_PRECISION = jax.lax.Precision.HIGHEST


def _similarity(rows: jax.Array, columns: jax.Array) -> jax.Array:
    """Dot products of every row with every column: (m, dim) x (n, dim) -> (m, n)."""
    return jnp.einsum("md,nd->mn", rows, columns, precision=_PRECISION)


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {choices}")


def _check_embeddings(image_embeds: jax.Array, text_embeds: jax.Array) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image and text embeddings must both be (batch, dim) and of equal shape; got "
            f"{image_embeds.shape} and {text_embeds.shape}"
        )


def _as_axis_tuple(axis_names: AxisNames) -> tuple[str, ...]:
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    if not names:
        raise ValueError(f"axis_names must name at least one mesh axis; got {axis_names!r}")
    return names


def _float32(*arrays: Any) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(array, jnp.float32) for array in arrays)


# --------------------------------------------------------------------------------------------
# Single-device references: the whole batch on one device.
# --------------------------------------------------------------------------------------------


def softmax_contrastive_loss(
    image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array | float
) -> jax.Array:
    """CLIP loss: mean cross-entropy of image->text and text->image logits, averaged.

    Embeddings are (batch, dim) and already L2-normalised; `logit_scale` is already exponentiated.
    """
    _check_embeddings(image_embeds, text_embeds)
    image_embeds, text_embeds, logit_scale = _float32(image_embeds, text_embeds, logit_scale)
    logits = logit_scale * _similarity(image_embeds, text_embeds)  # (batch, batch)
    positive_logits = jnp.diagonal(logits)
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive_logits)
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - positive_logits)
    return (image_to_text + text_to_image) / 2


def sigmoid_contrastive_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
) -> jax.Array:
    """SigLIP loss: -sum_ij log_sigmoid(z_ij * (scale * x_i.y_j + bias)) / batch, z = +1 on the
    diagonal (matching pairs) and -1 elsewhere."""
    _check_embeddings(image_embeds, text_embeds)
    image_embeds, text_embeds, logit_scale, logit_bias = _float32(image_embeds, text_embeds, logit_scale, logit_bias)
    batch_size = image_embeds.shape[0]
    logits = logit_scale * _similarity(image_embeds, text_embeds) + logit_bias
    signs = 2 * jnp.eye(batch_size, dtype=jnp.float32) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / batch_size


def in_batch_accuracy(image_embeds: jax.Array, text_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fractions of images whose most similar text is their own caption, and of texts whose most
    similar image is their own; for logging (a positive logit scale does not change the argmax)."""
    _check_embeddings(image_embeds, text_embeds)
    similarity = _similarity(*_float32(image_embeds, text_embeds))  # (batch, batch)
    targets = jnp.arange(similarity.shape[0])
    image_to_text = jnp.mean(jnp.argmax(similarity, axis=1) == targets)
    text_to_image = jnp.mean(jnp.argmax(similarity, axis=0) == targets)
    return image_to_text, text_to_image


# --------------------------------------------------------------------------------------------
# Sharded losses: called inside shard_map on each device's local rows; every device returns the
# loss of the global batch, and gradients are those of the single-device loss on that batch.
# --------------------------------------------------------------------------------------------


def sharded_contrastive_loss(
    local_image_embeds: jax.Array,
    local_text_embeds: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float | None,
    *,
    loss: str,
    axis_names: AxisNames,
    impl: str,
) -> jax.Array:
    """Loss of the global batch whose rows are split over the mesh axes `axis_names`.

    Must run inside `jax.shard_map` with the batch sharded over `axis_names` (several axes are
    flattened row-major, as `PartitionSpec((axis, ...))` lays them out). `loss` is "softmax"
    (CLIP; `logit_bias` is ignored and may be None) or "sigmoid" (SigLIP). `impl` is
    "all_gather" (gather the embeddings, O(local_batch * global_batch) memory) or "ring"
    (embeddings pass around the devices block by block, O(local_batch^2) memory for the loss).
    """
    _check_choice("loss", loss, LOSSES)
    _check_choice("impl", impl, IMPLEMENTATIONS)
    _check_embeddings(local_image_embeds, local_text_embeds)
    axes = _as_axis_tuple(axis_names)
    if loss == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs a logit_bias; got None")
    image, text, scale = _float32(local_image_embeds, local_text_embeds, logit_scale)
    if loss == "softmax":
        if impl == "all_gather":
            return _all_gather_softmax_loss(image, text, scale, axes)
        return _ring_softmax_loss(image, text, scale, axes)
    (bias,) = _float32(logit_bias)
    if impl == "all_gather":
        return _all_gather_sigmoid_loss(image, text, scale, bias, axes)
    return _ring_sigmoid_loss(image, text, scale, bias, axes)


def sharded_in_batch_accuracy(
    local_image_embeds: jax.Array, local_text_embeds: jax.Array, *, axis_names: AxisNames
) -> tuple[jax.Array, jax.Array]:
    """`in_batch_accuracy` of the global batch from inside shard_map (identical on every device).

    Gathers the embeddings, so it needs O(local_batch * global_batch) memory; meant for logging.
    """
    _check_embeddings(local_image_embeds, local_text_embeds)
    axes = _as_axis_tuple(axis_names)
    image, text = _float32(local_image_embeds, local_text_embeds)
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)
    targets = jax.lax.axis_index(axes) * local_batch + jnp.arange(local_batch)
    image_to_text = jnp.argmax(_similarity(image, gather(text, axes)), axis=1) == targets
    text_to_image = jnp.argmax(_similarity(text, gather(image, axes)), axis=1) == targets
    return (
        jax.lax.psum(jnp.sum(image_to_text), axes) / global_batch,
        jax.lax.psum(jnp.sum(text_to_image), axes) / global_batch,
    )


# ---- all_gather: local rows x global columns --------------------------------------------------


def _positive_mask(local_batch: int, axes: tuple[str, ...]) -> jax.Array:
    """(local_batch, global_batch) booleans: True where a local row meets its own pair."""
    global_batch = local_batch * jax.lax.axis_size(axes)
    first_row = jax.lax.axis_index(axes) * local_batch
    local_rows = first_row + jnp.arange(local_batch)
    return jnp.arange(global_batch)[None, :] == local_rows[:, None]


def _all_gather_softmax_loss(image: jax.Array, text: jax.Array, scale: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)
    positives = _positive_mask(local_batch, axes)
    # Each direction owns the rows of its local queries: local images against all texts, and
    # local texts against all images, so every global row is counted exactly once.
    partial_sum = 0.0
    for queries, candidates in ((image, text), (text, image)):
        logits = scale * _similarity(queries, gather(candidates, axes))  # (local, global)
        positive_logits = jnp.sum(jnp.where(positives, logits, 0.0), axis=1)
        partial_sum += jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive_logits)
    return jax.lax.psum(partial_sum, axes) / (2 * global_batch)


def _all_gather_sigmoid_loss(
    image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[str, ...]
) -> jax.Array:
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)
    # Every (image, text) pair appears once in the sum, so one direction covers them all.
    logits = scale * _similarity(image, gather(text, axes)) + bias  # (local, global)
    signs = jnp.where(_positive_mask(local_batch, axes), 1.0, -1.0)
    partial_sum = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    return jax.lax.psum(partial_sum, axes) / global_batch


# ---- ring: text blocks travel around the devices; nothing global is ever stored ---------------
#
# Device k holds local images I_k and texts T_k. The texts (with whatever per-column statistics
# travel with them) hop one device per step, so at step s device k sees T_{k+s}: the diagonal
# block (the matching pairs) at step 0, then every other block once. A block's logits are only
# (local_batch, local_batch). Column statistics and column gradients ride along with their text
# block and, after a full turn, arrive back on the block's home device.
# (The pass itself is clip_jax.collectives.ring_pass.)


def _block_gradients(
    image: jax.Array,
    visitor_text: jax.Array,
    similarity: jax.Array,
    logit_gradient: jax.Array,
    scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chain rule through logits = scale * image @ text.T (+ bias) for one block: gradients for the
    local images (local, dim), the visiting texts (local, dim) and the scale (scalar)."""
    image_gradient = scale * jnp.matmul(logit_gradient, visitor_text, precision=_PRECISION)
    text_gradient = scale * jnp.matmul(logit_gradient.T, image, precision=_PRECISION)
    return image_gradient, text_gradient, jnp.sum(logit_gradient * similarity)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_softmax_loss(image: jax.Array, text: jax.Array, scale: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    loss, _ = _ring_softmax_forward(image, text, scale, axes)
    return loss


def _ring_softmax_forward(image, text, scale, axes):
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)

    def step(resident, visitor_text, column_log_sum_exp, is_diagonal):
        row_log_sum_exp, positive_logits = resident
        logits = scale * _similarity(image, visitor_text)  # (local images, visiting texts)
        if is_diagonal:
            positive_logits = jnp.diagonal(logits)
        row_log_sum_exp = jnp.logaddexp(row_log_sum_exp, jax.nn.logsumexp(logits, axis=1))
        column_log_sum_exp = jnp.logaddexp(column_log_sum_exp, jax.nn.logsumexp(logits, axis=0))
        return (row_log_sum_exp, positive_logits), column_log_sum_exp

    empty = jnp.full((local_batch,), -jnp.inf, jnp.float32)
    (row_log_sum_exp, positive_logits), column_log_sum_exp = ring_pass(
        step, (empty, jnp.zeros_like(empty)), text, empty, axes
    )
    # Image->text rows and text->image columns (those of this device's texts) share the positives.
    partial_sum = jnp.sum(row_log_sum_exp) + jnp.sum(column_log_sum_exp) - 2 * jnp.sum(positive_logits)
    loss = jax.lax.psum(partial_sum, axes) / (2 * global_batch)
    return loss, (image, text, scale, row_log_sum_exp, column_log_sum_exp)


def _ring_softmax_backward(axes, residuals, loss_gradient):
    image, text, scale, row_log_sum_exp, column_log_sum_exp = residuals
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)
    weight = loss_gradient / (2 * global_batch)

    def step(resident, visitor, text_gradient, is_diagonal):
        image_gradient, scale_gradient = resident
        visitor_text, visitor_column_log_sum_exp = visitor
        similarity = _similarity(image, visitor_text)  # recomputed, never stored
        logits = scale * similarity
        # d loss / d logit: the row softmax plus the column softmax, minus 2 on the positives.
        logit_gradient = jnp.exp(logits - row_log_sum_exp[:, None]) + jnp.exp(
            logits - visitor_column_log_sum_exp[None, :]
        )
        if is_diagonal:
            logit_gradient = logit_gradient - 2 * jnp.eye(local_batch, dtype=jnp.float32)
        image_block, text_block, scale_block = _block_gradients(
            image, visitor_text, similarity, weight * logit_gradient, scale
        )
        resident = (image_gradient + image_block, scale_gradient + scale_block)
        return resident, text_gradient + text_block

    (image_gradient, scale_gradient), text_gradient = ring_pass(
        step,
        (jnp.zeros_like(image), jnp.zeros((), jnp.float32)),
        (text, column_log_sum_exp),
        jnp.zeros_like(text),
        axes,
    )
    # The scale is replicated: its gradient is the sum of every device's share.
    return image_gradient, text_gradient, jax.lax.psum(scale_gradient, axes)


_ring_softmax_loss.defvjp(_ring_softmax_forward, _ring_softmax_backward)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_loss(
    image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[str, ...]
) -> jax.Array:
    loss, _ = _ring_sigmoid_forward(image, text, scale, bias, axes)
    return loss


def _ring_sigmoid_forward(image, text, scale, bias, axes):
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)

    def step(partial_sum, visitor_text, no_accumulator, is_diagonal):
        logits = scale * _similarity(image, visitor_text) + bias
        if is_diagonal:
            signs = 2 * jnp.eye(local_batch, dtype=jnp.float32) - 1
            terms = -jax.nn.log_sigmoid(signs * logits)
        else:
            terms = jax.nn.softplus(logits)  # -log_sigmoid(-x): every pair here is negative
        return partial_sum + jnp.sum(terms), no_accumulator

    partial_sum, _ = ring_pass(step, jnp.zeros((), jnp.float32), text, (), axes)
    loss = jax.lax.psum(partial_sum, axes) / global_batch
    return loss, (image, text, scale, bias)


def _ring_sigmoid_backward(axes, residuals, loss_gradient):
    image, text, scale, bias = residuals
    local_batch = image.shape[0]
    global_batch = local_batch * jax.lax.axis_size(axes)
    weight = loss_gradient / global_batch

    def step(resident, visitor_text, text_gradient, is_diagonal):
        image_gradient, scale_gradient, bias_gradient = resident
        similarity = _similarity(image, visitor_text)  # recomputed, never stored
        # d loss / d logit = sigmoid(logit) - 1 on the positives, sigmoid(logit) elsewhere.
        logit_gradient = jax.nn.sigmoid(scale * similarity + bias)
        if is_diagonal:
            logit_gradient = logit_gradient - jnp.eye(local_batch, dtype=jnp.float32)
        logit_gradient = weight * logit_gradient
        image_block, text_block, scale_block = _block_gradients(image, visitor_text, similarity, logit_gradient, scale)
        resident = (
            image_gradient + image_block,
            scale_gradient + scale_block,
            bias_gradient + jnp.sum(logit_gradient),
        )
        return resident, text_gradient + text_block

    zero = jnp.zeros((), jnp.float32)
    (image_gradient, scale_gradient, bias_gradient), text_gradient = ring_pass(
        step, (jnp.zeros_like(image), zero, zero), text, jnp.zeros_like(text), axes
    )
    # The scale and bias are replicated: their gradients sum every device's share.
    return (
        image_gradient,
        text_gradient,
        jax.lax.psum(scale_gradient, axes),
        jax.lax.psum(bias_gradient, axes),
    )


_ring_sigmoid_loss.defvjp(_ring_sigmoid_forward, _ring_sigmoid_backward)


# --------------------------------------------------------------------------------------------
# Captioning objectives: per example, so the same code serves one device and many.
# --------------------------------------------------------------------------------------------


def caption_targets(texts: jax.Array, text_config: Any) -> jax.Array:
    """float32 (B, L): 1 where the caption decoder is trained to predict the token of `texts` (every
    token up to and including the end of text, but not the BPE's constant start token), else 0."""
    positions = jnp.arange(texts.shape[1])[None, :]
    weights = positions <= end_of_text_index(texts, text_config)[:, None]
    if text_config.pooling == "argmax":
        weights &= positions >= 1
    else:
        weights &= texts != text_config.pad_id
    return weights.astype(jnp.float32)


def caption_token_losses(logits: jax.Array, texts: jax.Array) -> jax.Array:
    """float32 (B, L): -log p(texts[b, i] | image, texts[b, :i]) from logits (B, L, vocab)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, texts[..., None].astype(jnp.int32), axis=-1)[..., 0]


def caption_loss(logits: jax.Array, texts: jax.Array, weights: jax.Array) -> jax.Array:
    """The mean of the predicted tokens' negative log-likelihoods (single-device reference)."""
    return jnp.sum(weights * caption_token_losses(logits, texts)) / jnp.maximum(jnp.sum(weights), 1.0)


def bag_of_words_targets(texts: jax.Array, text_config: Any, vocab_size: int) -> jax.Array:
    """float32 (B, vocab): the caption's words (the predicted tokens less the end of text) as a
    multi-hot row normalised to sum 1 (0 for a caption without words). A scatter, not a one-hot of
    (B, L, vocab), which for CLIP's 49,408-token vocabulary would be larger than the model's inputs."""
    positions = jnp.arange(texts.shape[1])[None, :]
    words = (caption_targets(texts, text_config) > 0) & (positions != end_of_text_index(texts, text_config)[:, None])
    rows = jnp.broadcast_to(jnp.arange(texts.shape[0])[:, None], texts.shape)
    present = jnp.zeros((texts.shape[0], vocab_size), jnp.float32).at[rows, texts].max(words.astype(jnp.float32))
    return present / jnp.maximum(jnp.sum(present, axis=-1, keepdims=True), 1.0)


def bag_of_words_example_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 (B,): the cross-entropy of the head's softmax over the vocabulary against the
    normalised bag of words — multi-label prediction as Joulin et al. (2016) found it trains best,
    the lineage of the CLIP paper's bag-of-words predictor."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def bag_of_words_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of `bag_of_words_example_losses` (single-device reference)."""
    return jnp.mean(bag_of_words_example_losses(logits, targets))


# --------------------------------------------------------------------------------------------
# Wrapper over a mesh, for the trainer and the tests.
# --------------------------------------------------------------------------------------------


def _mesh_batch_axes(mesh: Mesh, batch_axes: AxisNames) -> tuple[tuple[str, ...], int, bool]:
    """(the batch axes as a tuple, the shards along them, whether they are all explicit mesh axes)."""
    axes = _as_axis_tuple(batch_axes)
    unknown = [axis for axis in axes if axis not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch axes {unknown} are not axes of the mesh {mesh.axis_names}")
    num_shards = 1
    for axis in axes:
        num_shards *= mesh.shape[axis]
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    return axes, num_shards, all(axis_types[axis] == jax.sharding.AxisType.Explicit for axis in axes)


def make_sharded_loss_fn(
    mesh: Mesh,
    batch_axes: AxisNames = ("data",),
    loss: str = "softmax",
    impl: str = "all_gather",
) -> Callable[..., jax.Array]:
    """`fn(image_embeds, text_embeds, logit_scale, logit_bias=None) -> scalar`: the loss of the
    global batch, with the batch dimension sharded over `batch_axes` of `mesh`.

    Global (batch, dim) inputs are placed on the mesh as needed (with explicit mesh axes they are
    resharded; with auto axes shard_map does it). Differentiate it under `jax.jit`.
    """
    _check_choice("loss", loss, LOSSES)
    _check_choice("impl", impl, IMPLEMENTATIONS)
    axes, num_shards, explicit = _mesh_batch_axes(mesh, batch_axes)
    batch_spec = P(axes)

    def per_device(image_embeds, text_embeds, logit_scale, logit_bias):
        return sharded_contrastive_loss(
            image_embeds,
            text_embeds,
            logit_scale,
            logit_bias,
            loss=loss,
            axis_names=axes,
            impl=impl,
        )

    sharded_loss = jax.shard_map(per_device, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()), out_specs=P())

    def loss_fn(
        image_embeds: jax.Array,
        text_embeds: jax.Array,
        logit_scale: jax.Array | float,
        logit_bias: jax.Array | float | None = None,
    ) -> jax.Array:
        _check_embeddings(image_embeds, text_embeds)
        if image_embeds.shape[0] % num_shards:
            raise ValueError(
                f"global batch {image_embeds.shape[0]} does not split evenly over {num_shards} "
                f"shards of mesh axes {axes}"
            )
        if logit_bias is None:
            if loss == "sigmoid":
                raise ValueError("the sigmoid loss needs a logit_bias; got None")
            logit_bias = 0.0  # unused by the softmax loss; keeps shard_map's inputs fixed
        if explicit:
            placement = NamedSharding(mesh, batch_spec)
            image_embeds = jax.reshard(image_embeds, placement)
            text_embeds = jax.reshard(text_embeds, placement)
        return sharded_loss(
            image_embeds,
            text_embeds,
            jnp.asarray(logit_scale, jnp.float32),
            jnp.asarray(logit_bias, jnp.float32),
        )

    return loss_fn


# --------------------------------------------------------------------------------------------
# Objectives: what loss.name names, one record each.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Need:
    """A part of the model that a term trains or a contrastive loss uses: there when the model
    config's `field` is set (neither None nor False); a training run sets model.overrides.<field>."""

    what: str  # for the error: "a caption decoder"
    field: str  # the CLIPConfig attribute
    example: str  # for the error: a value to set it to

    def met_by(self, model_config: Any) -> bool:
        value = getattr(model_config, self.field, None)
        return value is not None and value is not False


LOGIT_BIAS = Need("a learned logit bias", "logit_bias_init", "-10.0, SigLIP's")
CAPTION_DECODER = Need("a caption decoder", "decoder", "--config.model.overrides.decoder.layers=6")
BAG_OF_WORDS_HEAD = Need("a bag-of-words head", "bag_of_words", "True")

# The terms an objective may sum, in the order zero-shot prefers their heads: "contrastive" (a loss
# of LOSSES over the global batch; zero-shot: cosine similarity with the class embeddings), "caption"
# (the decoder's per-token loss; zero-shot: its log-likelihood of the class prompts, CapPa) and
# "bag_of_words" (the head's; zero-shot: its mean log-probability of the prompt's words).
TERMS: tuple[str, ...] = ("contrastive", "caption", "bag_of_words")
TERM_NEEDS = {"contrastive": (), "caption": (CAPTION_DECODER,), "bag_of_words": (BAG_OF_WORDS_HEAD,)}
LOSS_NEEDS = {"softmax": (), "sigmoid": (LOGIT_BIAS,)}  # what each contrastive loss needs

Weight = float | str  # a fixed weight, or the name of the loss setting (a LossSettings field) holding it


@dataclasses.dataclass(frozen=True)
class Objective:
    """What one loss.name trains. `terms`: (term of TERMS, its weight), summed in this order;
    `zero_shot`: the term whose head zero-shot classification scores with; `contrastive`: the loss
    of LOSSES its "contrastive" term uses (None without that term)."""

    name: str
    terms: tuple[tuple[str, Weight], ...]
    zero_shot: str
    contrastive: str | None = None

    def __post_init__(self) -> None:
        names = [term for term, _ in self.terms]
        if not names or len(set(names)) != len(names) or not set(names) <= set(TERMS):
            raise ValueError(f"objective {self.name!r}: terms {names} must be distinct terms of {TERMS}")
        if self.contrastive not in (None, *LOSSES) or ("contrastive" in names) != (self.contrastive is not None):
            raise ValueError(
                f"objective {self.name!r}: contrastive {self.contrastive!r} must be one of {LOSSES} "
                "exactly when it has a contrastive term"
            )
        if self.zero_shot not in names:
            raise ValueError(f"objective {self.name!r}: zero_shot {self.zero_shot!r} is not one of its terms {names}")

    def weights(self, settings: Any = None) -> dict[str, float]:
        """{term: weight}; a weight that names a setting is read from `settings` (LossSettings)."""
        return {term: getattr(settings, weight) if isinstance(weight, str) else weight for term, weight in self.terms}

    @property
    def needs(self) -> tuple[Need, ...]:
        """What the model must have: its contrastive loss's needs, then its terms'."""
        return (*LOSS_NEEDS.get(self.contrastive, ()), *(need for term, _ in self.terms for need in TERM_NEEDS[term]))

    def check_model(self, model_config: Any) -> None:
        """A one-line ValueError naming the setting to set if `model_config` (a CLIPConfig) lacks a need."""
        for need in self.needs:
            if not need.met_by(model_config):
                raise ValueError(
                    f"loss.name={self.name!r}: the {self.name} loss needs a model with {need.what}; "
                    f"set model.overrides.{need.field} (e.g. {need.example})"
                )


def _registry(*objectives: Objective) -> dict[str, Objective]:
    return {objective.name: objective for objective in objectives}


# CoCa's terms: contrastive and caption, weighted by loss.contrastive_weight and loss.caption_weight.
COCA_TERMS: tuple[tuple[str, Weight], ...] = (("contrastive", "contrastive_weight"), ("caption", "caption_weight"))

# A contrastive loss alone (CLIP, SigLIP), the caption decoder's loss alone (CapPa's and the
# paper's transformer language model), the bag-of-words head's alone (the paper's bag-of-words
# predictor), and CoCa (softmax + caption).
OBJECTIVES: dict[str, Objective] = _registry(
    Objective("softmax", (("contrastive", 1.0),), zero_shot="contrastive", contrastive="softmax"),
    Objective("sigmoid", (("contrastive", 1.0),), zero_shot="contrastive", contrastive="sigmoid"),
    Objective("caption", (("caption", 1.0),), zero_shot="caption"),
    Objective("bag_of_words", (("bag_of_words", 1.0),), zero_shot="bag_of_words"),
    Objective("coca", COCA_TERMS, zero_shot="contrastive", contrastive="softmax"),
    Objective("sigmoid_coca", COCA_TERMS, zero_shot="contrastive", contrastive="sigmoid"),  # CoCa with SigLIP's loss
)


def get_objective(name: str) -> Objective:
    """The objective `name` names; one line naming the choices otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]
