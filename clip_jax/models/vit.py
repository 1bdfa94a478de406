"""OpenAI's VisionTransformer: patch embedding, class token, pre-LN transformer, class-token projection."""

from __future__ import annotations

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
)


class VisionTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(batch, H, W, 3) normalised images -> (batch, embed_dim) unnormalised embeddings."""
        cfg, vision = self.config, self.config.vision
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, height, width, channels = images.shape
        if (height, width) != (vision.image_size, vision.image_size):
            raise ValueError(f"images are {height}x{width}; this model takes {vision.image_size}x{vision.image_size}")
        patch, grid = vision.patch_size, vision.image_size // vision.patch_size
        scale = vision.width**-0.5

        # The stride-p, kernel-p, bias-free conv of OpenAI written as one matmul over flattened patches:
        # identical numbers, and XLA's CPU matmul is several times faster than its convolution.
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
        positional_embedding = self.param(
            "positional_embedding",
            partitioned(normal(scale), (LENGTH, EMBED)),
            (grid * grid + 1, vision.width),
            param_dtype,
        )
        class_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, vision.width))
        x = jnp.concatenate([class_tokens, x], axis=1) + positional_embedding.astype(dtype)
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
        x = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_post")(x[:, 0])
        projection = self.param(
            "projection",
            partitioned(normal(scale), (EMBED, "projection")),
            (vision.width, cfg.embed_dim),
            param_dtype,
        )
        return x @ projection.astype(dtype)
