"""The caption decoder: a causal transformer over the caption that also attends to the image's tokens.

Each block is pre-LN: causal self-attention over the caption, cross-attention from the caption to the
image tower's tokens (after its ln_post), then the MLP — CoCa's multimodal decoder and CapPa's
decoder without their poolers. The decoder embeds tokens with its own table and prepends a learned
start embedding, so logits[:, i] is the distribution of caption token i given tokens < i and the
image: the first token is predicted too, also for SentencePiece rows, which have no start token.
Blocks are unrolled (`block_{i}`) or scanned (`blocks`) and rematerialised like the towers'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    VOCAB,
    Attention,
    LayerNorm,
    MlpBlock,
    constrain,
    normal,
    partitioned,
    positional_embedding,
    stacked_blocks,
    token_embedding,
)


class DecoderBlock(nn.Module):
    """x + self_attn(ln_1(x)); x + cross_attn(ln_cross(x), image); x + mlp(ln_2(x)).
    Signature (carry, image) -> (carry, None) for `stacked_blocks`, which scans it with the image broadcast."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, x: jax.Array, image_tokens: jax.Array) -> tuple[jax.Array, None]:
        cfg, decoder = self.config, self.config.decoder
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # The towers' (OpenAI's) initialisation, with the residual branches scaled by depth.
        attn_std = decoder.width**-0.5
        proj_std = attn_std * (2 * decoder.layers) ** -0.5

        def attention(name: str, causal: bool) -> Attention:
            return Attention(
                num_heads=decoder.heads,
                in_stddev=attn_std,
                out_stddev=proj_std,
                dtype=dtype,
                param_dtype=param_dtype,
                causal=causal,
                implementation=cfg.attention_implementation,
                name=name,
            )

        x = constrain(x, (BATCH, LENGTH, EMBED))
        x = x + attention("attn", causal=True)(LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_1")(x))
        y = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_cross")(x)
        x = x + attention("cross_attn", causal=False)(y, image_tokens)
        y = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_2")(x)
        y = MlpBlock(
            hidden=int(decoder.width * decoder.mlp_ratio),
            activation=cfg.activation,
            in_stddev=(2 * decoder.width) ** -0.5,
            out_stddev=proj_std,
            dtype=dtype,
            param_dtype=param_dtype,
            name="mlp",
        )(y)
        return constrain(x + y, (BATCH, LENGTH, EMBED)), None


class CaptionDecoder(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, image_tokens: jax.Array, prefix: jax.Array) -> jax.Array:
        """image_tokens (batch, T, vision width), prefix int (batch, P) with P < context_length ->
        float32 logits (batch, P + 1, vocab): row i predicts caption token i from tokens < i."""
        cfg, decoder, text = self.config, self.config.decoder, self.config.text
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = prefix.shape
        if length + 1 > text.context_length:
            raise ValueError(f"a caption prefix of {length} tokens; the decoder predicts at most {text.context_length}")
        tokens = token_embedding(self, text.vocab_size, decoder.width, param_dtype)
        start = self.param("start_embedding", partitioned(normal(0.02), (EMBED,)), (decoder.width,), param_dtype)
        positions = positional_embedding(self, text.context_length, decoder.width, 0.01, param_dtype)
        x = jnp.concatenate(
            [
                jnp.broadcast_to(start.astype(dtype), (batch, 1, decoder.width)),
                jnp.take(tokens, prefix, axis=0).astype(dtype),
            ],
            axis=1,
        )
        x = x + positions[: length + 1].astype(dtype)
        image_tokens = constrain(image_tokens.astype(dtype), (BATCH, LENGTH, EMBED))
        x = stacked_blocks(DecoderBlock, decoder.layers, x, image_tokens, config=cfg)
        x = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_final")(x)
        head = self.param(
            "head",
            partitioned(normal(decoder.width**-0.5), (EMBED, VOCAB)),
            (decoder.width, text.vocab_size),
            param_dtype,
        )
        return (x @ head.astype(dtype)).astype(jnp.float32)
