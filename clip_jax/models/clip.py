"""The CLIP model: an image tower and a text tower meeting in one L2-normalised embedding space."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.layers import partitioned
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self) -> None:
        cfg = self.config
        self.visual = (VisionTransformer if cfg.vision.is_vit else ModifiedResNet)(cfg)
        self.text = TextTransformer(cfg)
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(cfg.logit_bias_init), ()), (), jnp.float32
            )

    def encode_image(
        self, images: jax.Array, train: bool = False, normalize: bool = False, patch_noise: jax.Array | None = None
    ) -> jax.Array:
        """(batch, H, W, 3) normalised images -> (batch, embed_dim) float32. `patch_noise`: the ViT's
        patch dropout while training (clip_jax.models.vit); None runs every patch."""
        if patch_noise is None:
            x = self.visual(images, train=train)
        else:  # only a ViT takes it: a config with patch_dropout and a ResNet is refused when built
            x = self.visual(images, train=train, patch_noise=patch_noise)
        x = x.astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def encode_text(self, texts: jax.Array, normalize: bool = False) -> jax.Array:
        """(batch, length) int token ids -> (batch, embed_dim) float32."""
        x = self.text(texts).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def __call__(
        self, images: jax.Array, texts: jax.Array, train: bool = False, patch_noise: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Both embeddings, L2-normalised, with the exponentiated temperature and the optional bias."""
        outputs = {
            "image_embeds": self.encode_image(images, train=train, normalize=True, patch_noise=patch_noise),
            "text_embeds": self.encode_text(texts, normalize=True),
            "logit_scale": jnp.exp(self.logit_scale),
        }
        if self.config.logit_bias_init is not None:
            outputs["logit_bias"] = self.logit_bias
        return outputs

    def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        """Zero images and texts of the shapes this model takes, for `init`."""
        size = self.config.vision.image_size
        return (
            jnp.zeros((batch_size, size, size, 3), jnp.float32),
            jnp.zeros((batch_size, self.config.text.context_length), jnp.int32),
        )

    def init_variables(self, rng: jax.Array, batch_size: int = 1) -> dict:
        """Variables with their logical-axis metadata boxes (`nn.Partitioned`); `nn.unbox` strips them."""
        return self.init(rng, *self.dummy_inputs(batch_size))
