"""The optimizer of CLIP training: AdamW with linear warmup then cosine decay, decoupled weight
decay and freezing chosen by regular expressions over "/"-joined parameter paths, global-norm
clipping, from `OptimizerSettings` (checked there)."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clip_jax.io.variables import parameter_path
from clip_jax.training.config import OptimizerSettings


def regex_mask(params: Any, pattern: str) -> Any:
    """A tree of booleans like `params`: True where `re.search(pattern, path)` matches the
    parameter's "/"-joined path. An empty pattern matches nothing."""
    compiled = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(compiled and compiled.search(parameter_path(path))), params
    )


def frozen_mask(freeze_regex: str, params: Any) -> Any:
    """True for the parameters that `freeze_regex` freezes (all False when it is empty). A
    non-empty pattern that matches no parameter is an error: it is surely a typo."""
    mask = regex_mask(params, freeze_regex)
    if freeze_regex and not any(jax.tree.leaves(mask)):
        paths = [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(f"optimizer.freeze_regex {freeze_regex!r} matches no parameter; paths look like {paths[:3]}")
    return mask


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
    """`step -> learning rate`: linear warmup to `learning_rate`, then cosine decay to 0 at
    `total_steps`.

    As open_clip's `cosine_lr`: step s < warmup gets lr * (s + 1) / warmup (so the first step
    already moves the weights), then lr * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2.
    """
    peak, warmup_steps = settings.learning_rate, settings.warmup_steps
    decay_steps = settings.total_steps - warmup_steps  # >= 1: OptimizerSettings checks it

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * (step + 1) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * peak * (1 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def make_optimizer(settings: OptimizerSettings, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """AdamW from the settings: `schedule` (a run builds its `learning_rate_schedule` once and
    passes it here and to the train step, which logs its value; built here when None), decoupled
    weight decay except on parameters matching `no_decay_regex`, global-norm clipping (0 = none).
    Parameters matching `freeze_regex` get zero updates and no optimizer state; the clipping norm
    is taken over the trainable parameters only. Built once per run: the train state holds it
    (`TrainState.tx`)."""
    no_decay_regex = settings.no_decay_regex

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda excluded: not excluded, regex_mask(params, no_decay_regex))

    adamw = optax.adamw(
        learning_rate_schedule(settings) if schedule is None else schedule,
        b1=settings.b1,
        b2=settings.b2,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        mask=decay_mask,
    )
    clip = settings.grad_clip_norm
    transform = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw
    if not settings.freeze_regex:
        return transform

    def labels(params: Any) -> Any:
        return jax.tree.map(
            lambda frozen: "frozen" if frozen else "trainable", frozen_mask(settings.freeze_regex, params)
        )

    return optax.multi_transform({"trainable": transform, "frozen": optax.set_to_zero()}, labels)
