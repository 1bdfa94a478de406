"""The causal text transformer, pooled at the end-of-text token and projected to the shared space."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig, TextConfig
from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    LayerNorm,
    Transformer,
    constrain,
    positional_embedding,
    project_to_embedding,
    token_embedding,
)


def end_of_text_index(texts: jax.Array, text: TextConfig) -> jax.Array:
    """(batch,) the position of each row's end-of-text token, where the tower pools (and where a
    caption ends, clip_jax.losses)."""
    if text.pooling == "argmax":  # CLIP BPE: [SOT, ..., EOT, 0, ...], the EOT id the largest id
        return jnp.argmax(texts, axis=-1)
    positions = jnp.arange(texts.shape[1])[None, :]  # "last": the last position that is not padding
    return jnp.max(jnp.where(texts != text.pad_id, positions, 0), axis=-1)


class TextTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, texts: jax.Array) -> jax.Array:
        """(batch, length <= context_length) int ids -> (batch, embed_dim) unnormalised embeddings."""
        cfg, text = self.config, self.config.text
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = texts.shape
        if length > text.context_length:
            raise ValueError(f"texts have {length} tokens; the context length is {text.context_length}")
        tokens = token_embedding(self, text.vocab_size, text.width, param_dtype)
        positions = positional_embedding(self, text.context_length, text.width, 0.01, param_dtype)
        x = jnp.take(tokens, texts, axis=0).astype(dtype)
        # Causal attention makes the pooled token blind to what follows it, so a shorter
        # (unpadded) input gives the same embedding as the padded one.
        x = x + positions[:length].astype(dtype)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        x = Transformer(
            cfg,
            width=text.width,
            heads=text.heads,
            layers=text.layers,
            mlp_ratio=text.mlp_ratio,
            causal=True,
            name="transformer",
        )(x)
        x = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_final")(x)
        x = x[jnp.arange(batch), end_of_text_index(texts, text)]  # (batch, width)
        return project_to_embedding(self, x, cfg.embed_dim, text.width**-0.5, dtype, param_dtype)
