"""OpenAI's ModifiedResNet: 3-conv stem, anti-aliased bottlenecks and an attention-pooling head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.layers import (
    BATCH,
    CONV_HEIGHT,
    CONV_IN,
    CONV_OUT,
    CONV_WIDTH,
    EMBED,
    LENGTH,
    NORM,
    Attention,
    constrain,
    partitioned,
    positional_embedding,
)


class ConvNorm(nn.Module):
    """A bias-free convolution followed by BatchNorm (torch's eps 1e-5, momentum 0.1)."""

    features: int
    kernel_size: int
    config: CLIPConfig
    strides: int = 1
    zero_init_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dtype, param_dtype = jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=partitioned(
                nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                (CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT),
            ),
            name="conv",
        )(x)
        # Stored statistics unless `train`: the released weights were trained with batch statistics,
        # and fine-tuning at small per-device batches is better off with them frozen.
        scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=partitioned(scale_init, (NORM,)),
            bias_init=partitioned(nn.initializers.zeros, (NORM,)),
            name="bn",
        )(x)


def average_pool(x: jax.Array, size: int) -> jax.Array:
    return x if size == 1 else nn.avg_pool(x, (size, size), strides=(size, size))


class Bottleneck(nn.Module):
    """Expansion-4 bottleneck; strided blocks average-pool after conv2 instead of striding the conv."""

    planes: int
    stride: int
    has_downsample: bool
    config: CLIPConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        out = nn.relu(ConvNorm(self.planes, 1, cfg, name="conv1")(x, train))
        out = nn.relu(ConvNorm(self.planes, 3, cfg, name="conv2")(out, train))
        out = average_pool(out, self.stride)
        out = ConvNorm(self.planes * 4, 1, cfg, zero_init_scale=True, name="conv3")(out, train)
        identity = x
        if self.has_downsample:
            identity = ConvNorm(self.planes * 4, 1, cfg, name="downsample")(average_pool(x, self.stride), train)
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Single-query attention over the final feature map, the query being the mean token."""

    num_heads: int
    output_dim: int
    config: CLIPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype, param_dtype = jnp.dtype(self.config.dtype), jnp.dtype(self.config.param_dtype)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # (batch, HW + 1, C)
        positions = positional_embedding(self, height * width + 1, channels, channels**-0.5, param_dtype)
        x = constrain(x + positions.astype(dtype), (BATCH, LENGTH, EMBED))
        std = channels**-0.5
        out = Attention(
            num_heads=self.num_heads,
            in_stddev=std,
            out_stddev=std,
            dtype=dtype,
            param_dtype=param_dtype,
            out_features=self.output_dim,
            implementation=self.config.attention_implementation,
            name="attn",
        )(x[:, :1], x)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(batch, H, W, 3) normalised images -> (batch, embed_dim). `train` uses batch statistics."""
        cfg, vision = self.config, self.config.vision
        height, width = images.shape[1:3]
        if (height, width) != (vision.image_size, vision.image_size):
            raise ValueError(f"images are {height}x{width}; this model takes {vision.image_size}x{vision.image_size}")
        x = images.astype(jnp.dtype(cfg.dtype))
        stem_width = vision.width // 2
        x = nn.relu(ConvNorm(stem_width, 3, cfg, strides=2, name="stem1")(x, train))
        x = nn.relu(ConvNorm(stem_width, 3, cfg, name="stem2")(x, train))
        x = nn.relu(ConvNorm(vision.width, 3, cfg, name="stem3")(x, train))
        x = average_pool(x, 2)

        in_planes = vision.width
        for stage, depth in enumerate(vision.layers):
            planes = vision.width * 2**stage
            for index in range(depth):
                stride = 2 if (stage > 0 and index == 0) else 1
                x = Bottleneck(
                    planes=planes,
                    stride=stride,
                    has_downsample=stride > 1 or in_planes != planes * 4,
                    config=cfg,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
                in_planes = planes * 4
        return AttentionPool2d(num_heads=vision.num_heads, output_dim=cfg.embed_dim, config=cfg, name="attnpool")(x)
