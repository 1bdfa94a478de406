"""The jitted training step (towers on the local batch, contrastive loss inside shard_map, exact
GradCache gradient accumulation, AdamW update); evaluation embeds with clip_jax.evaluation.features.Encoder."""

from __future__ import annotations

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
from clip_jax.sharding import (
    BATCH_AXES, activation_sharding, batch_axis_size, batch_sharding, check_batch_divisible, replicated,
)
from clip_jax.training.nonfinite import finite_leaf_flags, tolerated_skips
from clip_jax.training.optimizer import frozen_mask, learning_rate_schedule, make_optimizer
from clip_jax.training.state import TrainState

Batch = dict[str, jax.Array]  # {"images": float32 (B, H, W, 3), "texts": int32 (B, L)}
Metrics = dict[str, jax.Array]


def _check_batch(batch: Batch, mesh: Mesh, accumulation_steps: int) -> None:
    """Check the batch's keys and shapes (at trace time, so before compiling)."""
    missing = {"images", "texts"} - set(batch)
    if missing:
        raise ValueError(f"the batch lacks {sorted(missing)}; it has {sorted(batch)}")
    images, texts = batch["images"], batch["texts"]
    if images.ndim != 4 or texts.ndim != 2 or images.shape[0] != texts.shape[0]:
        raise ValueError(
            f"expected images (B, H, W, 3) and texts (B, L) of one batch size; got {images.shape} and "
            f"{texts.shape}"
        )
    check_batch_divisible(images.shape[0], mesh, accumulation_steps)


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


def make_train_step(
    model: CLIP, config: Any, mesh: Mesh, state_shardings: TrainState
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (new_state, metrics)`, one jitted function that donates `state`.

    `batch` = {"images": float32 (B, H, W, 3) normalised, "texts": int32 (B, L)}, global arrays
    sharded over `BATCH_AXES`. Reads config.loss (name, impl, max_logit_scale), config.optimizer
    (through `make_optimizer`), config.total_steps, config.global_batch_size,
    config.accumulation_steps, config.train_batch_norm and config.nonfinite. `metrics` holds float32
    scalars: loss, accuracy_image_to_text, accuracy_text_to_image (in-batch, global), logit_scale
    (the exponentiated, clamped scale of the forward), learning_rate (of this update), grad_norm
    (global norm before clipping), nonfinite (1 if this step's update was not finite), skipped_steps
    (the state's total after this step) and, for the sigmoid loss, logit_bias.

    The non-finite guard: the update is applied only if the loss, the gradient norm and the new
    BatchNorm statistics are all finite, and the steps skipped in a row just before are no more
    than config.nonfinite tolerates ("stop" tolerates none). Otherwise params,
    opt_state and batch_stats come out bit for bit as they went in and the state's skip counters
    grow. `state.step` advances either way, so the loop's step, the data position and the
    checkpoints stay aligned; the optimizer's own counts (Adam's bias correction, the learning rate
    schedule) count applied updates only, so each skipped step delays the rest of the schedule by
    one step, as if the skipped batch had not been drawn. Once past the tolerated number nothing is
    applied until the loop, which reads the counters when it syncs, stops the run.

    The temperature is clamped to [1, max_logit_scale] (the log-parameter to [0, log max]) in the
    forward and after each update, as open_clip's `logit_scale.clamp_(0, math.log(100))`.

    With config.accumulation_steps = k > 1 the gradient is that of the whole batch (GradCache): all
    k micro-batches are embedded without keeping activations, the loss and its gradient with
    respect to the embeddings are computed on the whole batch, then each micro-batch's forward is
    redone under `jax.vjp` and its parameter gradients are summed. Exact, at the activation memory
    of one micro-batch. With config.train_batch_norm the ResNet normalises with the statistics of
    each micro-batch (the only departure from the full-batch step) and its running statistics
    become the mean of the micro-batches' updates.
    """
    loss_name = str(config.loss.name)
    # Validates the loss name and implementation.
    loss_fn = losses.make_sharded_loss_fn(mesh, BATCH_AXES, loss_name, str(config.loss.impl))
    if loss_name == "sigmoid" and model.config.logit_bias_init is None:
        raise ValueError(
            "the sigmoid loss needs a model with a learned logit bias; set model.overrides."
            "logit_bias_init (SigLIP uses -10)"
        )
    max_logit_scale = float(config.loss.max_logit_scale)
    if max_logit_scale <= 0:
        raise ValueError(f"loss.max_logit_scale must be > 0; got {max_logit_scale}")
    max_log_scale = math.log(max_logit_scale)

    def clamp_log_scale(log_scale: jax.Array) -> jax.Array:
        return jnp.clip(log_scale, 0.0, max_log_scale)

    tolerated = tolerated_skips(config.nonfinite)
    accumulation_steps = int(config.accumulation_steps)
    check_batch_divisible(int(config.global_batch_size), mesh, accumulation_steps)
    update_batch_stats = bool(config.train_batch_norm) and not model.config.vision.is_vit
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    shards = batch_axis_size(mesh)
    accuracy_fn = jax.shard_map(
        lambda image, text: losses.sharded_in_batch_accuracy(image, text, axis_names=BATCH_AXES),
        mesh=mesh,
        in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
        out_specs=(P(), P()),
    )
    embeddings_sharding = batch_sharding(mesh)
    micro_batched_sharding = NamedSharding(mesh, P(None, BATCH_AXES))

    def embed(params, batch_stats, images, texts):
        """((image_embeds, text_embeds) L2-normalised float32 (b, D), updated batch_stats)."""
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        with activation_sharding(mesh):
            if update_batch_stats:
                outputs, updates = model.apply(variables, images, texts, train=True, mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            else:
                outputs = model.apply(variables, images, texts, train=False)
        embeddings = (outputs["image_embeds"], outputs["text_embeds"])
        return jax.lax.with_sharding_constraint(embeddings, embeddings_sharding), batch_stats

    def head_loss(head_params, image_embeds, text_embeds):
        """The global-batch loss from the embeddings and the temperature (and bias) parameters."""
        logit_scale = jnp.exp(clamp_log_scale(head_params["logit_scale"]))
        return loss_fn(image_embeds, text_embeds, logit_scale, head_params.get("logit_bias"))

    def compute_gradients(params, batch_stats, images, texts, stop_frozen):
        """(loss, gradients like params, (image_embeds, text_embeds), new batch_stats)."""
        head_params = {name: params[name] for name in ("logit_scale", "logit_bias") if name in params}
        head_loss_and_gradients = jax.value_and_grad(head_loss, argnums=(0, 1, 2))

        def embed_trainable(params, images, texts):
            return embed(stop_frozen(params), batch_stats, images, texts)

        if accumulation_steps == 1:
            embeddings, embed_vjp, new_batch_stats = jax.vjp(
                lambda params: embed_trainable(params, images, texts), params, has_aux=True
            )
            loss, (head_gradients, *embedding_gradients) = head_loss_and_gradients(
                stop_frozen(head_params), *embeddings
            )
            (gradients,) = embed_vjp(tuple(embedding_gradients))
        else:
            micro_images, micro_texts = jax.lax.with_sharding_constraint(
                (
                    _to_micro_batches(images, accumulation_steps, shards),
                    _to_micro_batches(texts, accumulation_steps, shards),
                ),
                micro_batched_sharding,
            )

            def forward(_, micro_batch):
                return None, embed(params, batch_stats, *micro_batch)

            # Pass 1: embeddings only; nothing is differentiated, so no activation is kept.
            _, (micro_embeddings, micro_batch_stats) = jax.lax.scan(
                forward, None, (micro_images, micro_texts)
            )
            embeddings = jax.lax.with_sharding_constraint(
                tuple(_from_micro_batches(e, shards) for e in micro_embeddings), embeddings_sharding
            )
            loss, (head_gradients, *embedding_gradients) = head_loss_and_gradients(
                stop_frozen(head_params), *embeddings
            )
            micro_embedding_gradients = jax.lax.with_sharding_constraint(
                tuple(_to_micro_batches(g, accumulation_steps, shards) for g in embedding_gradients),
                micro_batched_sharding,
            )

            # Pass 2: redo each micro-batch's forward under vjp and pull its share of the
            # embedding gradient back to the parameters; sum over micro-batches.
            def backward(gradient_sum, micro_batch):
                micro_images, micro_texts, micro_gradients = micro_batch
                _, embed_vjp, _ = jax.vjp(
                    lambda params: embed_trainable(params, micro_images, micro_texts), params, has_aux=True
                )
                (gradients,) = embed_vjp(micro_gradients)
                return jax.tree.map(jnp.add, gradient_sum, gradients), None

            zeros = jax.lax.with_sharding_constraint(
                jax.tree.map(jnp.zeros_like, params), state_shardings.params
            )
            gradients, _ = jax.lax.scan(
                backward, zeros, (micro_images, micro_texts, micro_embedding_gradients)
            )
            new_batch_stats = batch_stats
            if update_batch_stats:
                new_batch_stats = jax.tree.map(lambda stats: jnp.mean(stats, axis=0), micro_batch_stats)
        # The temperature and bias enter only through the loss head.
        gradients = {
            **gradients,
            **{name: gradients[name] + gradient for name, gradient in head_gradients.items()},
        }
        return loss, gradients, embeddings, new_batch_stats

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_batch(batch, mesh, accumulation_steps)
        images = batch["images"].astype(jnp.float32)
        texts = batch["texts"].astype(jnp.int32)
        frozen = frozen_mask(config.optimizer, state.params)

        def stop_frozen(params):
            """Frozen parameters (LiT) get no gradient, so XLA skips their tower's backward pass.
            `params` is the whole tree or a subset of its top-level entries."""
            return jax.tree.map(
                lambda leaf, is_frozen: jax.lax.stop_gradient(leaf) if is_frozen else leaf,
                params,
                {name: frozen[name] for name in params},
            )

        loss, gradients, (image_embeds, text_embeds), new_batch_stats = compute_gradients(
            state.params, state.batch_stats, images, texts, stop_frozen
        )
        grad_norm = optax.tree.norm(gradients)
        # A NaN or inf anywhere in the gradients makes their global norm NaN or inf. The updated
        # parameters are not tested: that would need the update computed before choosing it; a
        # finite gradient that overflows a parameter (an absurd learning rate) is caught by the
        # loop's check before each save (clip_jax.training.nonfinite) or at the next step's loss.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(finite_leaf_flags(new_batch_stats))
        apply = finite & (state.consecutive_skipped_steps <= tolerated)

        def update(operands):
            params, opt_state, _, gradients, new_batch_stats = operands
            updates, opt_state = optimizer.update(gradients, opt_state, params)
            params = optax.apply_updates(params, updates)
            # As open_clip: the temperature parameter itself is clamped after every update.
            params = {**params, "logit_scale": clamp_log_scale(params["logit_scale"])}
            return params, opt_state, new_batch_stats

        def keep(operands):
            params, opt_state, batch_stats, _, _ = operands
            return params, opt_state, batch_stats

        # A cond, as optax.apply_if_finite (which itself would wrap the optimizer state, accept
        # updates again after its limit and leave the BatchNorm statistics out): a skipped step
        # returns its inputs untouched, bit for bit, and computes no update. An element-wise
        # jnp.where(apply, new, old) over the state measured worse: XLA copies the donated state
        # so as to read the old values after writing the new (ViT-B/32 step compiled for CPU:
        # 1.55 GB of copies per step against 0.32 GB without the guard; with the cond, 0.30 GB).
        params, opt_state, new_batch_stats = jax.lax.cond(
            apply, update, keep, (state.params, state.opt_state, state.batch_stats, gradients, new_batch_stats)
        )
        skipped = jnp.logical_not(apply).astype(jnp.int32)
        skipped_steps = state.skipped_steps + skipped
        consecutive_skipped_steps = jnp.where(apply, 0, state.consecutive_skipped_steps + 1)
        accuracy_image_to_text, accuracy_text_to_image = accuracy_fn(
            jax.lax.stop_gradient(image_embeds), jax.lax.stop_gradient(text_embeds)
        )
        metrics = {
            "loss": loss,
            "accuracy_image_to_text": accuracy_image_to_text,
            "accuracy_text_to_image": accuracy_text_to_image,
            "logit_scale": jnp.exp(clamp_log_scale(state.params["logit_scale"])),
            # The optimizer's schedule counts applied updates: steps so far less those skipped.
            "learning_rate": schedule(state.step - state.skipped_steps),
            "grad_norm": grad_norm,
            "nonfinite": jnp.logical_not(finite),
            "skipped_steps": skipped_steps,
        }
        if loss_name == "sigmoid":
            metrics["logit_bias"] = state.params["logit_bias"]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            batch_stats=new_batch_stats,
            skipped_steps=skipped_steps,
            consecutive_skipped_steps=consecutive_skipped_steps,
        )
        return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
