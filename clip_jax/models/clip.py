"""The CLIP model: an image tower and a text tower meeting in one L2-normalised embedding space."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.decoder import CaptionDecoder
from clip_jax.models.layers import VOCAB, partitioned
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
        if cfg.decoder is not None:
            self.decoder = CaptionDecoder(cfg)
        if cfg.bag_of_words:
            self.bag_of_words_head = nn.Dense(
                cfg.text.vocab_size,
                dtype=jnp.float32,
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=partitioned(nn.initializers.normal(cfg.embed_dim**-0.5), ("projection", VOCAB)),
                bias_init=partitioned(nn.initializers.zeros, (VOCAB,)),
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

    def encode_image_tokens(
        self, images: jax.Array, train: bool = False, patch_noise: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(unnormalised embeddings float32 (batch, embed_dim), every token of the ViT after ln_post
        (batch, 1 + kept patches, vision width)): what a caption decoder attends to."""
        if not self.config.vision.is_vit:
            raise ValueError("image tokens come from a ViT; this model's image tower is a ResNet")
        x, tokens = self.visual(images, train=train, patch_noise=patch_noise, return_tokens=True)
        return x.astype(jnp.float32), tokens

    def decode(self, image_tokens: jax.Array, prefix: jax.Array) -> jax.Array:
        """Caption logits float32 (batch, P + 1, vocab) given the image tokens and a caption prefix
        (batch, P) of ids: row i is the distribution of caption token i given tokens < i."""
        if self.config.decoder is None:
            raise ValueError("this model has no caption decoder (model config decoder=None)")
        return self.decoder(image_tokens, prefix)

    def bag_of_words_logits(self, image_embeds: jax.Array) -> jax.Array:
        """(batch, embed_dim) unnormalised image embeddings -> float32 (batch, vocab) word logits."""
        if not self.config.bag_of_words:
            raise ValueError("this model has no bag-of-words head (model config bag_of_words=False)")
        return self.bag_of_words_head(image_embeds.astype(jnp.float32))

    def encode_text(self, texts: jax.Array, normalize: bool = False) -> jax.Array:
        """(batch, length) int token ids -> (batch, embed_dim) float32."""
        x = self.text(texts).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def __call__(
        self, images: jax.Array, texts: jax.Array, train: bool = False, patch_noise: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Both embeddings, L2-normalised, with the exponentiated temperature and the optional bias;
        with a decoder, "caption_logits" (batch, L, vocab) predicting every token of `texts`; with a
        bag-of-words head, "bag_of_words_logits" (batch, vocab)."""
        cfg = self.config
        if cfg.decoder is not None:
            embeds, tokens = self.encode_image_tokens(images, train=train, patch_noise=patch_noise)
        else:
            embeds, tokens = self.encode_image(images, train=train, patch_noise=patch_noise), None
        outputs = {
            "image_embeds": l2_normalize(embeds),
            "text_embeds": self.encode_text(texts, normalize=True),
            "logit_scale": jnp.exp(self.logit_scale),
        }
        if cfg.logit_bias_init is not None:
            outputs["logit_bias"] = self.logit_bias
        if cfg.decoder is not None:
            outputs["caption_logits"] = self.decode(tokens, texts[:, :-1])
        if cfg.bag_of_words:
            outputs["bag_of_words_logits"] = self.bag_of_words_logits(embeds)
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
