"""The jitted training step: the towers on the local batch, the contrastive loss over the global
batch inside shard_map, the captioning objectives' per-example terms (caption decoder, bag of
words), exact GradCache gradient accumulation, the non-finite guard, the optimizer's update (the optimizer travels with the state: `TrainState.tx`) and the parameters'
moving average (config.ema).

`make_train_step` builds a `_StepContext` (everything fixed for a run: model, mesh, settings, loss
function) and jits `_train_step` over it; the pieces below each do one part of the step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import losses
from clip_jax.models import CLIP
from clip_jax.models.vit import make_patch_noise
from clip_jax.sharding import (
    BATCH_AXES,
    activation_sharding,
    batch_axis_size,
    batch_sharding,
    check_batch_divisible,
    replicated,
)
from clip_jax.training.config import EMASettings, StepSettings
from clip_jax.training.nonfinite import finite_leaf_flags
from clip_jax.training.optimizer import frozen_mask, learning_rate_schedule
from clip_jax.training.state import TrainState

Batch = dict[str, jax.Array]  # {"images": float32 (B, H, W, 3), "texts": int32 (B, L)}
Metrics = dict[str, jax.Array]


def _check_batch(batch: Batch) -> None:
    """Check the batch's keys and shapes (at trace time, so before compiling); its size against
    the mesh was checked with the settings (`_check_step_settings`)."""
    missing = {"images", "texts"} - set(batch)
    if missing:
        raise ValueError(f"the batch lacks {sorted(missing)}; it has {sorted(batch)}")
    images, texts = batch["images"], batch["texts"]
    if images.ndim != 4 or texts.ndim != 2 or images.shape[0] != texts.shape[0]:
        raise ValueError(
            f"expected images (B, H, W, 3) and texts (B, L) of one batch size; got {images.shape} and {texts.shape}"
        )


def _to_micro_batches(x: jax.Array, accumulation_steps: int, shards: int) -> jax.Array:
    """(B, ...) -> (k, B / k, ...): micro-batch m takes, from every device's local rows, its m-th
    slice, so each micro-batch stays evenly sharded over the batch axes and no example moves
    between devices. (B, ...) -> (shards, k, local / k, ...) -> (k, shards, local / k, ...)."""
    local_micro = x.shape[0] // (shards * accumulation_steps)
    x = x.reshape(shards, accumulation_steps, local_micro, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accumulation_steps, shards * local_micro, *x.shape[3:])


def _from_micro_batches(x: jax.Array, shards: int) -> jax.Array:
    """Inverse of `_to_micro_batches`: (k, B / k, ...) -> (B, ...) in the original row order."""
    accumulation_steps, micro_batch = x.shape[:2]
    x = x.reshape(accumulation_steps, shards, micro_batch // shards, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(accumulation_steps * micro_batch, *x.shape[3:])


@dataclasses.dataclass(frozen=True)
class _StepContext:
    """What every step of a run shares (hashable: jit's static argument)."""

    model: CLIP
    mesh: Mesh
    settings: StepSettings
    params_shardings: Any = dataclasses.field(hash=False, compare=False)
    loss_fn: Callable = dataclasses.field(hash=False, compare=False)
    accuracy_fn: Callable = dataclasses.field(hash=False, compare=False)
    schedule: Callable = dataclasses.field(hash=False, compare=False)
    shards: int = 1  # devices along the batch axes

    @property
    def max_log_scale(self) -> float:
        return math.log(self.settings.loss.max_logit_scale)

    @property
    def update_batch_stats(self) -> bool:
        return self.settings.train_batch_norm and not self.model.config.vision.is_vit

    def clamp_log_scale(self, log_scale: jax.Array) -> jax.Array:
        """As open_clip's `logit_scale.clamp_(0, math.log(100))`: the temperature stays in [1, max]."""
        return jnp.clip(log_scale, 0.0, self.max_log_scale)


# Folded into the state's key (after the step) for the patch-dropout noise, so that other
# stochastic parts added later draw from streams of their own.
PATCH_DROPOUT_STREAM = 1


def _patch_noise(context: _StepContext, state: TrainState, batch_size: int) -> jax.Array | None:
    """float32 (B, N) noise choosing each image's kept patches (FLIP), or None without patch dropout.

    A function of (state.rng, state.step) only, so a resumed run masks exactly as an uninterrupted
    one; drawn for the whole global batch and then split like the images, so GradCache's
    micro-batches give every example the mask the whole-batch step gives it."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), PATCH_DROPOUT_STREAM)
    noise = make_patch_noise(key, batch_size, context.model.config)
    return None if noise is None else jax.lax.with_sharding_constraint(noise, batch_sharding(context.mesh))


def _normalizers(context: _StepContext, texts: jax.Array) -> dict[str, jax.Array]:
    """The whole batch's count for each per-example term of the objective (predicted tokens for the
    caption loss, examples for the bag of words): each micro-batch divides its sum by it, so the
    terms add up to the whole batch's means however the batch is split."""
    weights = context.settings.loss.weights
    normalizers = {}
    if "caption" in weights:
        normalizers["caption"] = jnp.maximum(jnp.sum(losses.caption_targets(texts, context.model.config.text)), 1.0)
    if "bag_of_words" in weights:
        normalizers["bag_of_words"] = jnp.float32(texts.shape[0])
    return normalizers


def _per_example_terms(context: _StepContext, outputs: dict, texts: jax.Array, normalizers: dict) -> dict:
    """{term: its rows' summed loss / the whole batch's count} for the captioning terms."""
    text_config, terms = context.model.config.text, {}
    if "caption" in normalizers:
        weights = losses.caption_targets(texts, text_config)
        token_losses = losses.caption_token_losses(outputs["caption_logits"], texts)
        terms["caption"] = jnp.sum(weights * token_losses) / normalizers["caption"]
    if "bag_of_words" in normalizers:
        targets = losses.bag_of_words_targets(texts, text_config, text_config.vocab_size)
        example_losses = losses.bag_of_words_example_losses(outputs["bag_of_words_logits"], targets)
        terms["bag_of_words"] = jnp.sum(example_losses) / normalizers["bag_of_words"]
    return terms


def _embed(context: _StepContext, params, batch_stats, images, texts, noise=None, normalizers=None):
    """(((image_embeds, text_embeds) L2-normalised float32 (b, D), per-example terms), updated
    batch_stats). `noise`: the patch-dropout noise of these rows (`_patch_noise`), None to run every
    patch; `normalizers`: `_normalizers` of the whole batch (the terms are {} without)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    with activation_sharding(context.mesh):
        if context.update_batch_stats:
            outputs, updates = context.model.apply(variables, images, texts, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            outputs = context.model.apply(variables, images, texts, train=False, patch_noise=noise)
    embeddings = jax.lax.with_sharding_constraint(
        (outputs["image_embeds"], outputs["text_embeds"]), batch_sharding(context.mesh)
    )
    return (embeddings, _per_example_terms(context, outputs, texts, normalizers or {})), batch_stats


def _head_loss(context: _StepContext, head_params: Any, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """The global-batch loss from the embeddings and the temperature (and bias) parameters."""
    logit_scale = jnp.exp(context.clamp_log_scale(head_params["logit_scale"]))
    return context.loss_fn(image_embeds, text_embeds, logit_scale, head_params.get("logit_bias"))


def _contrastive(context: _StepContext, head_params: Any, embeddings: tuple) -> tuple:
    """(contrastive loss or None, gradients of weight x loss w.r.t. the head parameters and the two
    embeddings). Without a contrastive term both gradients are zero."""
    weight = context.settings.loss.weights.get("contrastive")
    if weight is None:
        return None, jax.tree.map(jnp.zeros_like, head_params), jax.tree.map(jnp.zeros_like, embeddings)

    def weighted(head_params, image_embeds, text_embeds):
        loss = _head_loss(context, head_params, image_embeds, text_embeds)
        return (loss if weight == 1.0 else weight * loss), loss  # x 1.0 left out: the step stays as it was

    (_, loss), (head_gradients, *embedding_gradients) = jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True)(
        head_params, *embeddings
    )
    return loss, head_gradients, tuple(embedding_gradients)


def _term_cotangents(context: _StepContext, terms: dict) -> dict:
    """d(total loss) / d(term): each per-example term's weight."""
    return {name: jnp.float32(context.settings.loss.weights[name]) for name in terms}


def _whole_batch_gradients(context, params, batch_stats, images, texts, noise, stop_frozen, head_params, normalizers):
    """(contrastive loss or None, per-example terms, head gradients, tower gradients, embeddings,
    new batch_stats) of the whole batch at once."""
    (embeddings, terms), embed_vjp, new_batch_stats = jax.vjp(
        lambda params: _embed(context, stop_frozen(params), batch_stats, images, texts, noise, normalizers),
        params,
        has_aux=True,
    )
    contrastive, head_gradients, embedding_gradients = _contrastive(context, stop_frozen(head_params), embeddings)
    (gradients,) = embed_vjp((embedding_gradients, _term_cotangents(context, terms)))
    return contrastive, terms, head_gradients, gradients, embeddings, new_batch_stats


def _accumulated_gradients(context, params, batch_stats, images, texts, noise, stop_frozen, head_params, normalizers):
    """The same as `_whole_batch_gradients`, exactly, at the activation memory of one micro-batch
    (GradCache): embed every micro-batch without keeping activations, take the contrastive loss and
    its gradient with respect to the embeddings on the whole batch, then redo each micro-batch's
    forward under `jax.vjp` and sum its parameter gradients (and its per-example terms, which need
    no other row). Without a contrastive term the first pass is skipped: nothing needs the batch."""
    k, shards = context.settings.accumulation_steps, context.shards
    micro_sharding = NamedSharding(context.mesh, P(None, BATCH_AXES))
    # The noise (or None) is split like the images: each example keeps the mask of the whole-batch step.
    micro_images, micro_texts, micro_noise = jax.lax.with_sharding_constraint(
        tuple(None if x is None else _to_micro_batches(x, k, shards) for x in (images, texts, noise)), micro_sharding
    )
    embeddings, contrastive = None, None
    head_gradients = jax.tree.map(jnp.zeros_like, head_params)
    micro_embedding_gradients = None
    if "contrastive" in context.settings.loss.weights:
        # Pass 1: embeddings only; nothing is differentiated, so no activation is kept.
        _, ((micro_embeddings, _), _) = jax.lax.scan(
            lambda _, micro_batch: (None, _embed(context, params, batch_stats, *micro_batch)),
            None,
            (micro_images, micro_texts, micro_noise),
        )
        embeddings = jax.lax.with_sharding_constraint(
            tuple(_from_micro_batches(e, shards) for e in micro_embeddings), batch_sharding(context.mesh)
        )
        contrastive, head_gradients, embedding_gradients = _contrastive(context, stop_frozen(head_params), embeddings)
        micro_embedding_gradients = jax.lax.with_sharding_constraint(
            tuple(_to_micro_batches(g, k, shards) for g in embedding_gradients), micro_sharding
        )

    # Pass 2: redo each micro-batch's forward under vjp and pull its share of the embedding
    # gradient (and its terms' weights) back to the parameters; sum over micro-batches.
    def backward(gradient_sum, micro_batch):
        micro_images, micro_texts, micro_noise, micro_gradients = micro_batch
        (micro_embeddings, terms), embed_vjp, micro_batch_stats = jax.vjp(
            lambda params: _embed(
                context, stop_frozen(params), batch_stats, micro_images, micro_texts, micro_noise, normalizers
            ),
            params,
            has_aux=True,
        )
        if micro_gradients is None:
            micro_gradients = jax.tree.map(jnp.zeros_like, micro_embeddings)
        (gradients,) = embed_vjp((micro_gradients, _term_cotangents(context, terms)))
        return jax.tree.map(jnp.add, gradient_sum, gradients), (terms, micro_batch_stats)

    zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), context.params_shardings)
    gradients, (micro_terms, micro_batch_stats) = jax.lax.scan(
        backward, zeros, (micro_images, micro_texts, micro_noise, micro_embedding_gradients)
    )
    terms = jax.tree.map(lambda term: jnp.sum(term, axis=0), micro_terms)
    new_batch_stats = batch_stats
    if context.update_batch_stats:
        new_batch_stats = jax.tree.map(lambda stats: jnp.mean(stats, axis=0), micro_batch_stats)
    return contrastive, terms, head_gradients, gradients, embeddings, new_batch_stats


def _compute_gradients(context, params, batch_stats, images, texts, noise, stop_frozen):
    """(total loss, {term: value}, gradients like params, (image_embeds, text_embeds) or None,
    new batch_stats). The total is the weighted sum of the objective's terms (its losses.Objective)."""
    head_params = {name: params[name] for name in ("logit_scale", "logit_bias") if name in params}
    compute = _whole_batch_gradients if context.settings.accumulation_steps == 1 else _accumulated_gradients
    contrastive, terms, head_gradients, gradients, embeddings, new_batch_stats = compute(
        context, params, batch_stats, images, texts, noise, stop_frozen, head_params, _normalizers(context, texts)
    )
    # The temperature and bias enter only through the loss head.
    gradients = {**gradients, **{name: gradients[name] + gradient for name, gradient in head_gradients.items()}}
    weights = context.settings.loss.weights
    if contrastive is not None:
        terms = {"contrastive": contrastive, **terms}
    loss = None
    for name, value in terms.items():  # not sum(): its 0 + would change the contrastive step's graph
        weighted = value if weights[name] == 1.0 else weights[name] * value
        loss = weighted if loss is None else loss + weighted
    return loss, terms, gradients, (embeddings if contrastive is not None else None), new_batch_stats


def ema_decay(settings: EMASettings, applied_updates: jax.Array) -> jax.Array:
    """The decay of the update that follows `applied_updates` applied ones (float32 scalar):
    `settings.decay`, or with warm-up min(decay, (1 + n) / (10 + n))."""
    decay = jnp.float32(settings.decay)
    if not settings.warmup:
        return decay
    n = applied_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _updated_ema(context: _StepContext, state: TrainState, params: Any) -> Any:
    """The moving average moved toward the updated `params`: ema + (1 - d) * (params - ema). In
    this form a parameter that did not change (frozen by LiT) leaves its average bit for bit."""
    if state.ema_params is None:
        return None
    # Applied updates before this one: the steps so far less those skipped (what the optimizer counts).
    step_size = 1.0 - ema_decay(context.settings.ema, state.step - state.skipped_steps)
    return jax.tree.map(lambda ema, new: ema + (step_size * (new - ema)).astype(ema.dtype), state.ema_params, params)


def _guarded_update(context: _StepContext, state: TrainState, gradients: Any, new_batch_stats: Any, finite: jax.Array):
    """(params, opt_state, batch_stats, ema_params, applied): the optimizer's update (and the
    moving average's) if `finite` and the skips in a row so far are no more than the policy
    tolerates; else the state's own, bit for bit.

    A cond, as optax.apply_if_finite (which itself would wrap the optimizer state, accept updates
    again after its limit and leave the BatchNorm statistics out): a skipped step returns its
    inputs untouched and computes no update. An element-wise jnp.where(apply, new, old) over the
    state measured worse: XLA copies the donated state so as to read the old values after writing
    the new, several times the bytes the step without the guard copies (measured on a ViT-B/32 step
    compiled for CPU); the step with the cond copies no more than the step without the guard."""
    applied = finite & (state.consecutive_skipped_steps <= context.settings.nonfinite.tolerated_skips)

    def update(operands):
        params, opt_state, _, _, gradients, new_batch_stats = operands
        updates, opt_state = state.tx.update(gradients, opt_state, params)
        params = optax.apply_updates(params, updates)
        # As open_clip: the temperature parameter itself is clamped after every update.
        params = {**params, "logit_scale": context.clamp_log_scale(params["logit_scale"])}
        return params, opt_state, new_batch_stats, _updated_ema(context, state, params)

    def keep(operands):
        params, opt_state, batch_stats, ema_params, _, _ = operands
        return params, opt_state, batch_stats, ema_params

    operands = (state.params, state.opt_state, state.batch_stats, state.ema_params, gradients, new_batch_stats)
    return (*jax.lax.cond(applied, update, keep, operands), applied)


def _train_step(context: _StepContext, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    _check_batch(batch)
    images = batch["images"].astype(jnp.float32)
    texts = batch["texts"].astype(jnp.int32)
    frozen = frozen_mask(context.settings.optimizer.freeze_regex, state.params)

    def stop_frozen(params):
        """Frozen parameters (LiT) get no gradient, so XLA skips their tower's backward pass.
        `params` is the whole tree or a subset of its top-level entries."""
        return jax.tree.map(
            lambda leaf, is_frozen: jax.lax.stop_gradient(leaf) if is_frozen else leaf,
            params,
            {name: frozen[name] for name in params},
        )

    loss, terms, gradients, embeddings, new_batch_stats = _compute_gradients(
        context,
        state.params,
        state.batch_stats,
        images,
        texts,
        _patch_noise(context, state, images.shape[0]),
        stop_frozen,
    )
    grad_norm = optax.tree.norm(gradients)
    # A NaN or inf anywhere in the gradients makes their global norm NaN or inf. The updated
    # parameters are not tested: that would need the update computed before choosing it; a finite
    # gradient that overflows a parameter (an absurd learning rate) is caught by the loop's check
    # before each save (clip_jax.training.nonfinite) or at the next step's loss.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(finite_leaf_flags(new_batch_stats))
    params, opt_state, new_batch_stats, ema_params, applied = _guarded_update(
        context, state, gradients, new_batch_stats, finite
    )
    skipped_steps = state.skipped_steps + jnp.logical_not(applied).astype(jnp.int32)
    metrics = {
        "loss": loss,
        "logit_scale": jnp.exp(context.clamp_log_scale(state.params["logit_scale"])),
        # The optimizer's schedule counts applied updates: steps so far less those skipped.
        "learning_rate": context.schedule(state.step - state.skipped_steps),
        "grad_norm": grad_norm,
        "nonfinite": jnp.logical_not(finite),
        "skipped_steps": skipped_steps,
    }
    if embeddings is not None:  # a contrastive objective: its in-batch retrieval accuracies
        accuracies = context.accuracy_fn(*jax.lax.stop_gradient(embeddings))
        metrics["accuracy_image_to_text"], metrics["accuracy_text_to_image"] = accuracies
    if len(terms) > 1 or "contrastive" not in terms:  # each term of a captioning objective, unweighted
        metrics.update({f"{name}_loss": value for name, value in terms.items()})
    if losses.LOGIT_BIAS in context.settings.loss.objective.needs:  # an objective that learns the bias
        metrics["logit_bias"] = state.params["logit_bias"]
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=new_batch_stats,
        ema_params=ema_params,
        skipped_steps=skipped_steps,
        consecutive_skipped_steps=jnp.where(applied, 0, state.consecutive_skipped_steps + 1),
    )
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


def _check_step_settings(model: CLIP, settings: StepSettings, mesh: Mesh, state_shardings: TrainState) -> None:
    """Refuse, before tracing, what the step cannot run."""
    settings.loss.objective.check_model(model.config)  # what the objective needs of the model
    check_batch_divisible(settings.global_batch_size, mesh, settings.accumulation_steps)
    if settings.ema.enabled != (state_shardings.ema_params is not None):
        raise ValueError(
            f"ema.decay={settings.ema.decay} but the state {'lacks' if settings.ema.enabled else 'has'} ema_params; "
            "build it with abstract_train_state/create_train_state(ema=settings.ema.enabled)"
        )


def _contrastive_loss_fn(mesh: Mesh, settings: StepSettings) -> Callable:
    """The sharded contrastive loss of the objective's record (built but never traced when it has none)."""
    return losses.make_sharded_loss_fn(mesh, BATCH_AXES, settings.loss.contrastive or "softmax", settings.loss.impl)


def make_train_step(
    model: CLIP, settings: StepSettings, mesh: Mesh, state_shardings: TrainState, schedule: Callable | None = None
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (new_state, metrics)`, one jitted function that donates `state`.

    `batch` = {"images": float32 (B, H, W, 3) normalised, "texts": int32 (B, L)}, global arrays
    sharded over `BATCH_AXES`. `schedule`: the optimizer's, logged (None: from `settings.optimizer`).
    `metrics`: float32 scalars loss, accuracy_image_to_text and accuracy_text_to_image (in-batch,
    global; contrastive objectives), each term of a captioning
    objective (contrastive_loss, caption_loss, bag_of_words_loss), logit_scale (exponentiated,
    clamped), learning_rate (of this update), grad_norm (before clipping), nonfinite (1 if this
    update was not finite), skipped_steps (total after this step), logit_bias (objectives that
    learn one, e.g. sigmoid).

    The non-finite guard: the update is applied only if the loss, the gradient norm and the new
    BatchNorm statistics are all finite, and the steps skipped in a row just before are no more
    than `settings.nonfinite` tolerates ("stop" tolerates none). Otherwise params, opt_state and
    batch_stats come out bit for bit as they went in and the state's skip counters grow.
    `state.step` advances either way, so the loop's step, the data position and the checkpoints
    stay aligned; the optimizer's own counts (Adam's bias correction, the learning rate schedule)
    count applied updates only, so each skipped step delays the rest of the schedule by one step,
    as if the skipped batch had not been drawn. Once past the tolerated number nothing is applied
    until the loop, which reads the counters when it syncs, stops the run.

    The temperature is clamped to [1, max_logit_scale] (the log-parameter to [0, log max]) in the
    forward and after each update. With `settings.accumulation_steps` = k > 1 the gradient is that
    of the whole batch (GradCache, `_accumulated_gradients`). With `settings.train_batch_norm` the
    ResNet normalises with the statistics of each micro-batch (the only departure from the
    full-batch step) and its running statistics become the mean of the micro-batches' updates.

    With `settings.ema` the state's `ema_params` move toward the new parameters with each applied
    update only (`_updated_ema`); a skipped step leaves them bit for bit.

    With the model's `vision.patch_dropout` > 0 (FLIP) the image tower runs on a random subset of
    each image's patches, drawn from (state.rng, state.step) for the whole batch (`_patch_noise`);
    FLIP's unmasked tuning phase runs the step of the same model without patch dropout
    (clip_jax.training.setup compiles both).
    """
    _check_step_settings(model, settings, mesh, state_shardings)
    context = _StepContext(
        model=model,
        mesh=mesh,
        settings=settings,
        params_shardings=state_shardings.params,
        loss_fn=_contrastive_loss_fn(mesh, settings),
        accuracy_fn=jax.shard_map(
            lambda image, text: losses.sharded_in_batch_accuracy(image, text, axis_names=BATCH_AXES),
            mesh=mesh,
            in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
            out_specs=(P(), P()),
        ),
        schedule=learning_rate_schedule(settings.optimizer) if schedule is None else schedule,
        shards=batch_axis_size(mesh),
    )
    return jax.jit(
        functools.partial(_train_step, context),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
