"""OpenAI's VisionTransformer: patch embedding, class token, pre-LN transformer, class-token projection.

With `vision.patch_dropout` = p > 0 and `patch_noise` given (training only, clip_jax.training.step),
each image keeps the floor((1 - p) * N) of its N patch tokens with the smallest noise, after the
positional embeddings are added, and the transformer runs on those and the class token: FLIP
(Li et al. 2023). Without `patch_noise` (evaluation, `clip_jax.load`) every patch is kept.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.layers import (
    BATCH,
    CONV_HEIGHT,
    CONV_IN,
    CONV_WIDTH,
    EMBED,
    LENGTH,
    LayerNorm,
    Transformer,
    constrain,
    normal,
    partitioned,
    positional_embedding,
    project_to_embedding,
)


def kept_patches(num_patches: int, patch_dropout: float) -> int:
    """How many of `num_patches` patch tokens an image keeps under `patch_dropout`: (1 - p) * N
    rounded down, as FLIP's and open_clip's code do, and at least one. (The 1e-9 keeps a product
    such as (1 - 0.9) * 100 = 9.999999999999998 at 10.)"""
    return max(1, math.floor((1.0 - patch_dropout) * num_patches + 1e-9))


def make_patch_noise(rng: jax.Array, batch_size: int, config: CLIPConfig) -> jax.Array | None:
    """float32 (batch, N) uniform noise choosing each image's kept patches; None without patch dropout.
    Drawn for the whole batch at once so that splitting the batch (GradCache) keeps every row's mask."""
    vision = config.vision
    if not vision.is_vit or not vision.patch_dropout:
        return None
    return jax.random.uniform(rng, (batch_size, (vision.image_size // vision.patch_size) ** 2), jnp.float32)


def _drop_patches(x: jax.Array, noise: jax.Array, keep: int) -> jax.Array:
    """(B, 1 + N, D) -> (B, 1 + keep, D): the class token and, per row, the `keep` patches of least
    noise (argsort of the noise: a static count, so shapes stay static and the FLOPs really drop)."""
    if noise.shape != (x.shape[0], x.shape[1] - 1):
        raise ValueError(f"patch_noise has shape {noise.shape}; expected {(x.shape[0], x.shape[1] - 1)}")
    kept = jnp.argsort(noise, axis=1)[:, :keep]  # (B, keep) patch indices
    patches = jnp.take_along_axis(x[:, 1:], kept[:, :, None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)


class VisionTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, patch_noise: jax.Array | None = None, return_tokens: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """(batch, H, W, 3) normalised images -> (batch, embed_dim) unnormalised embeddings; with
        `return_tokens`, also every token after ln_post (batch, 1 + kept patches, width), which a
        caption decoder attends to.

        `patch_noise` (float (batch, N), `make_patch_noise`): with `vision.patch_dropout` > 0, drop
        patches as it says (training); ignored without patch dropout."""
        cfg, vision = self.config, self.config.vision
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = self._tokens(images)  # (batch, 1 + N, width): the class token and the patches, positions added
        num_patches = x.shape[1] - 1
        keep = kept_patches(num_patches, vision.patch_dropout)
        if patch_noise is not None and keep < num_patches:
            x = _drop_patches(x, patch_noise, keep)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        x = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_pre")(x)
        x = Transformer(
            cfg,
            width=vision.width,
            heads=vision.num_heads,
            layers=vision.layers,
            mlp_ratio=vision.mlp_ratio,
            name="transformer",
        )(x)
        ln_post = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_post")
        # The class token alone unless the tokens are wanted: the contrastive path stays as it was.
        tokens = ln_post(x) if return_tokens else None
        x = tokens[:, 0] if return_tokens else ln_post(x[:, 0])
        x = project_to_embedding(self, x, cfg.embed_dim, vision.width**-0.5, dtype, param_dtype)
        return (x, tokens) if return_tokens else x

    def _tokens(self, images: jax.Array) -> jax.Array:
        """(batch, H, W, 3) -> (batch, 1 + N, width): the class token then the N patch embeddings,
        with the positional embeddings added."""
        cfg, vision = self.config, self.config.vision
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, height, width, channels = images.shape
        if (height, width) != (vision.image_size, vision.image_size):
            raise ValueError(f"images are {height}x{width}; this model takes {vision.image_size}x{vision.image_size}")
        patch, grid = vision.patch_size, vision.image_size // vision.patch_size
        scale = vision.width**-0.5

        # The stride-p, kernel-p, bias-free conv of OpenAI written as one matmul over flattened patches:
        # identical numbers, and XLA's CPU matmul is faster than its convolution.
        kernel = self.param(
            "patch_embedding",
            partitioned(nn.initializers.lecun_normal(), (CONV_HEIGHT, CONV_WIDTH, CONV_IN, EMBED)),
            (patch, patch, channels, vision.width),
            param_dtype,
        )
        x = images.astype(dtype).reshape(batch, grid, patch, grid, patch, channels)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, patch * patch * channels)
        x = x @ kernel.astype(dtype).reshape(patch * patch * channels, vision.width)

        class_embedding = self.param(
            "class_embedding", partitioned(normal(scale), (EMBED,)), (vision.width,), param_dtype
        )
        positions = positional_embedding(self, grid * grid + 1, vision.width, scale, param_dtype)
        class_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, vision.width))
        return jnp.concatenate([class_tokens, x], axis=1) + positions.astype(dtype)
