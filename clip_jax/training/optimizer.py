"""The optimizer of CLIP training: AdamW with linear warmup then cosine decay, decoupled weight
decay and freezing chosen by regular expressions over "/"-joined parameter paths, global-norm
clipping."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax


def parameter_path(key_path: tuple[Any, ...]) -> str:
    """"/"-joined names of a key path from `jax.tree_util.tree_map_with_path`, e.g.
    "visual/transformer/block_0/attn/query/kernel"."""
    names = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(key))
    return "/".join(names)


def regex_mask(params: Any, pattern: str) -> Any:
    """A tree of booleans like `params`: True where `re.search(pattern, path)` matches the
    parameter's "/"-joined path. An empty pattern matches nothing."""
    compiled = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(compiled and compiled.search(parameter_path(path))), params
    )


def frozen_mask(optimizer_config: Any, params: Any) -> Any:
    """True for the parameters that `optimizer_config.freeze_regex` freezes (all False when it is
    empty). A non-empty pattern that matches no parameter is an error: it is surely a typo."""
    pattern = str(optimizer_config.freeze_regex)
    mask = regex_mask(params, pattern)
    if pattern and not any(jax.tree.leaves(mask)):
        paths = [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(
            f"optimizer.freeze_regex {pattern!r} matches no parameter; paths look like {paths[:3]}"
        )
    return mask


def _check_positive_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"optimizer.warmup_steps ({warmup_steps}) must be >= 0 and smaller than total_steps ({total_steps})"
        )


def check_optimizer_config(optimizer_config: Any, total_steps: int) -> None:
    """Raise a one-line ValueError naming the field and its value for `config.optimizer` settings
    that cannot train: all the optimizer's checks, run by `make_optimizer` and, before anything is
    built, by the training loop's `validate_config`."""
    learning_rate = float(optimizer_config.learning_rate)
    # A negative rate trains uphill, zero not at all, and NaN or inf poisons the first update.
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"optimizer.learning_rate must be a finite number > 0; got {learning_rate}")
    _check_positive_steps(int(total_steps), int(optimizer_config.warmup_steps))
    for name in ("b1", "b2"):
        value = float(optimizer_config[name])
        if not 0 <= value < 1:  # Adam's bias correction divides by 1 - beta ** t
            raise ValueError(f"optimizer.{name} must be in [0, 1); got {value}")
    eps = float(optimizer_config.eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"optimizer.eps must be > 0; got {eps}")
    weight_decay = float(optimizer_config.weight_decay)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"optimizer.weight_decay must be >= 0; got {weight_decay}")
    grad_clip_norm = float(optimizer_config.grad_clip_norm)
    if not (math.isfinite(grad_clip_norm) and grad_clip_norm >= 0):
        raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0 = off); got {grad_clip_norm}")
    for name in ("no_decay_regex", "freeze_regex"):
        pattern = str(optimizer_config[name])
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"optimizer.{name} {pattern!r} is not a valid regular expression: {error}")


def learning_rate_schedule(optimizer_config: Any, total_steps: int) -> optax.Schedule:
    """`step -> learning rate`: linear warmup to `learning_rate`, then cosine decay to 0 at
    `total_steps`.

    As open_clip's `cosine_lr`: step s < warmup gets lr * (s + 1) / warmup (so the first step
    already moves the weights), then lr * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2.
    """
    peak = float(optimizer_config.learning_rate)
    warmup_steps = int(optimizer_config.warmup_steps)
    _check_positive_steps(total_steps, warmup_steps)
    decay_steps = total_steps - warmup_steps

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * (step + 1) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * peak * (1 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def make_optimizer(optimizer_config: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW from the `config.optimizer` fields: learning_rate, warmup_steps, b1, b2, eps,
    weight_decay, no_decay_regex, grad_clip_norm (0 = no clipping) and freeze_regex ("" = train
    everything). Parameters whose path matches `freeze_regex` get zero updates and no optimizer
    state; the clipping norm is taken over the trainable parameters only."""
    check_optimizer_config(optimizer_config, total_steps)
    weight_decay = float(optimizer_config.weight_decay)
    grad_clip_norm = float(optimizer_config.grad_clip_norm)
    no_decay_regex = str(optimizer_config.no_decay_regex)

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda excluded: not excluded, regex_mask(params, no_decay_regex))

    adamw = optax.adamw(
        learning_rate_schedule(optimizer_config, total_steps),
        b1=float(optimizer_config.b1),
        b2=float(optimizer_config.b2),
        eps=float(optimizer_config.eps),
        weight_decay=weight_decay,
        mask=decay_mask,
    )
    transform = optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw) if grad_clip_norm else adamw
    if not optimizer_config.freeze_regex:
        return transform

    def labels(params: Any) -> Any:
        return jax.tree.map(
            lambda frozen: "frozen" if frozen else "trainable", frozen_mask(optimizer_config, params)
        )

    return optax.multi_transform({"trainable": transform, "frozen": optax.set_to_zero()}, labels)
