"""Building blocks shared by the towers: float32 LayerNorm, attention, MLP and a (scanned) transformer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig

# Logical axis names. Sharding rules (clip_jax.sharding) map these to mesh axes.
BATCH, LENGTH, EMBED, MLP, HEADS, KV, VOCAB, LAYERS = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "layers",
)
CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT = "conv_height", "conv_width", "conv_in", "conv_out"
NORM = "norm"  # the feature axis of a LayerNorm / BatchNorm scale or bias


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def normal(stddev: float) -> Callable:
    return nn.initializers.normal(stddev=stddev)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def token_embedding(module: nn.Module, vocab_size: int, width: int, param_dtype: jnp.dtype) -> jax.Array:
    """`module`'s (vocab, width) "token_embedding" table, OpenAI's N(0, 0.02) initialisation."""
    return module.param("token_embedding", partitioned(normal(0.02), (VOCAB, EMBED)), (vocab_size, width), param_dtype)


def positional_embedding(
    module: nn.Module, length: int, width: int, stddev: float, param_dtype: jnp.dtype
) -> jax.Array:
    """`module`'s learned (length, width) "positional_embedding", N(0, stddev) initialised."""
    return module.param(
        "positional_embedding", partitioned(normal(stddev), (LENGTH, EMBED)), (length, width), param_dtype
    )


def project_to_embedding(
    module: nn.Module, x: jax.Array, embed_dim: int, stddev: float, dtype: jnp.dtype, param_dtype: jnp.dtype
) -> jax.Array:
    """(..., width) -> (..., embed_dim) through `module`'s bias-free "projection" into the space the
    two towers share."""
    width = x.shape[-1]
    projection = module.param(
        "projection", partitioned(normal(stddev), (EMBED, "projection")), (width, embed_dim), param_dtype
    )
    return x @ projection.astype(dtype)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":  # OpenAI's x * sigmoid(1.702 x)
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":  # torch.nn.GELU: the exact erf form
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}")


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype (bf16 statistics lose too much)."""

    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-5  # torch's default, which the released weights were trained with

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=partitioned(nn.initializers.ones, (NORM,)),
            bias_init=partitioned(nn.initializers.zeros, (NORM,)),
            name="norm",
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class HeadProjection(nn.Module):
    """x (..., embed) -> (..., heads, head_dim) with a kernel kept as (embed, heads, head_dim).

    Written as a parameter and an einsum rather than `nn.DenseGeneral`, which reshapes its kernel
    to 2-D before boxing it and so cannot carry three logical axis names under a mesh.
    """

    heads: int
    head_dim: int
    stddev: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(normal(self.stddev), (EMBED, HEADS, KV)),
            (x.shape[-1], self.heads, self.head_dim),
            self.param_dtype,
        )
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros, (HEADS, KV)), (self.heads, self.head_dim), self.param_dtype
        )
        return jnp.einsum("...e,ehk->...hk", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class OutputProjection(nn.Module):
    """(..., heads, head_dim) -> (..., features) with a kernel kept as (heads, head_dim, features)."""

    features: int
    stddev: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim = x.shape[-2:]
        kernel = self.param(
            "kernel",
            partitioned(normal(self.stddev), (HEADS, KV, EMBED)),
            (heads, head_dim, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", partitioned(nn.initializers.zeros, (EMBED,)), (self.features,), self.param_dtype)
        return jnp.einsum("...hk,hke->...e", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, causal: bool, implementation: str) -> jax.Array:
    """Scaled dot-product attention over (batch, length, heads, head_dim) inputs.

    "auto" takes cuDNN's fused kernel where it applies (GPU, 16-bit inputs) and XLA's otherwise;
    cuDNN's checks run at trace time, so a shape it does not support falls back to XLA.
    """
    if implementation == "auto":
        if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation="cudnn")
            except Exception:  # noqa: BLE001 - any refusal of the fused kernel means: use XLA's
                pass
        implementation = "xla"
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation=implementation)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections kept as (embed, heads, head_dim)."""

    num_heads: int
    in_stddev: float
    out_stddev: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = False
    out_features: int | None = None  # default: the input width
    implementation: str = "auto"  # see `attention`

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None) -> jax.Array:
        if inputs_kv is None:
            inputs_kv = inputs_q
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads

        def projection(name: str) -> HeadProjection:
            return HeadProjection(self.num_heads, head_dim, self.in_stddev, self.dtype, self.param_dtype, name=name)

        query = projection("query")(inputs_q)  # (batch, q_length, heads, head_dim)
        key = projection("key")(inputs_kv)
        value = projection("value")(inputs_kv)
        query = constrain(query, (BATCH, LENGTH, HEADS, KV))
        key = constrain(key, (BATCH, LENGTH, HEADS, KV))
        value = constrain(value, (BATCH, LENGTH, HEADS, KV))
        out = attention(query, key, value, self.causal, self.implementation)
        out = constrain(out, (BATCH, LENGTH, HEADS, KV))
        return OutputProjection(self.out_features or width, self.out_stddev, self.dtype, self.param_dtype, name="out")(
            out
        )


class MlpBlock(nn.Module):
    hidden: int
    activation: str
    in_stddev: float
    out_stddev: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(normal(self.in_stddev), (EMBED, MLP)),
            bias_init=partitioned(nn.initializers.zeros, (MLP,)),
            name="fc",
        )(x)
        x = constrain(activation_fn(self.activation)(x), (BATCH, LENGTH, MLP))
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(normal(self.out_stddev), (MLP, EMBED)),
            bias_init=partitioned(nn.initializers.zeros, (EMBED,)),
            name="proj",
        )(x)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Signature (carry, _) so nn.scan can drive it."""

    config: CLIPConfig
    width: int
    heads: int
    layers: int
    mlp_ratio: float
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array, _unused: None = None) -> tuple[jax.Array, None]:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # OpenAI's initialisation (open_clip's init_parameters).
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        x = constrain(x, (BATCH, LENGTH, EMBED))
        y = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_1")(x)
        y = Attention(
            num_heads=self.heads,
            in_stddev=attn_std,
            out_stddev=proj_std,
            dtype=dtype,
            param_dtype=param_dtype,
            causal=self.causal,
            implementation=cfg.attention_implementation,
            name="attn",
        )(y)
        x = x + y
        y = LayerNorm(param_dtype=param_dtype, dtype=dtype, name="ln_2")(x)
        y = MlpBlock(
            hidden=int(self.width * self.mlp_ratio),
            activation=cfg.activation,
            in_stddev=fc_std,
            out_stddev=proj_std,
            dtype=dtype,
            param_dtype=param_dtype,
            name="mlp",
        )(y)
        x = constrain(x + y, (BATCH, LENGTH, EMBED))
        return x, None


def remat_policy(name: str) -> Callable | None:
    policies = {
        "full": None,  # nn.remat with no policy saves nothing: the whole block is recomputed
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; expected 'none' or one of {sorted(policies)}")
    return policies[name]


def stacked_blocks(
    block_cls: type[nn.Module], layers: int, x: jax.Array, context: Any = None, /, **block_args: Any
) -> jax.Array:
    """`layers` blocks `block_cls(**block_args)`, each (carry, context) -> (carry, None), applied to
    `x` from inside a module's compact method: unrolled as `block_{i}`, or scanned as `blocks` with
    the parameters stacked on axis 0 and `context` (the decoder's image tokens; None for a tower)
    given to every layer; each block rematerialised by the remat policy of `block_args["config"]`.
    (Positional-only: the blocks' own fields may be called `layers` or `config` too.)"""
    config: CLIPConfig = block_args["config"]
    if config.remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=remat_policy(config.remat_policy), prevent_cse=not config.scan_layers)
    if config.scan_layers:
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=layers,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        x, _ = scanned(**block_args, name="blocks")(x, context)
        return x
    for i in range(layers):
        x, _ = block_cls(**block_args, name=f"block_{i}")(x, context)
    return x


class Transformer(nn.Module):
    """`layers` residual blocks, unrolled (`block_{i}`) or scanned (`blocks`, params stacked on axis 0)."""

    config: CLIPConfig
    width: int
    heads: int
    layers: int
    mlp_ratio: float
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return stacked_blocks(
            ResidualBlock,
            self.layers,
            x,
            config=self.config,
            width=self.width,
            heads=self.heads,
            layers=self.layers,
            mlp_ratio=self.mlp_ratio,
            causal=self.causal,
        )
