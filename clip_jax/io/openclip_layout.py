"""open_clip's state-dict layout <-> clip_jax's Flax variables, and the model config read off its shapes.

Every PyTorch source (OpenAI, open_clip, transformers) is first brought to open_clip's layout
(numpy arrays keyed like `visual.transformer.resblocks.0.attn.in_proj_weight`, see
`clip_jax.io.torch_checkpoint`); the one table of rules here (`_rules`) then maps that layout to
and from the Flax variable tree, both directions side by side.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from clip_jax.models import CLIP, CLIPConfig, TextConfig, VisionConfig, get_model_config
from clip_jax.models.layout import FlatVariables, stack_layers, unstack_layers

StateDict = dict[str, np.ndarray]

# Keys that carry no learned value: buffers rebuilt by the model, or OpenAI's hyper-parameter scalars.
_IGNORED_KEYS = re.compile(
    r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size|position_ids)$|num_batches_tracked$"
)


class ConversionError(ValueError):
    """The checkpoint does not match the CLIP architecture: a missing, extra or mis-shaped tensor."""


def _count(state_dict: StateDict, pattern: str) -> int:
    return len({m[1] for k in state_dict if (m := re.match(pattern, k))})


def infer_config(state_dict: StateDict, activation: str = "quick_gelu") -> CLIPConfig:
    """The model config read off tensor shapes, as OpenAI's `build_model` does."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConversionError(f"cannot infer the architecture: missing tensor {key!r}")
        return state_dict[key].shape

    if "visual.class_embedding" in state_dict:  # a ViT; ModifiedResNets have no class token
        width, _, patch, _ = shape("visual.conv1.weight")
        grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch * grid,
            width=width,
            layers=_count(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."),
            patch_size=patch,
        )
    else:
        width = shape("visual.layer1.0.conv1.weight")[0]
        grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=grid * 32,
            width=width,
            layers=tuple(_count(state_dict, rf"visual\.layer{s}\.(\d+)\.") for s in range(1, 5)),
            patch_size=None,
        )
    text_width = shape("ln_final.weight")[0]
    text = TextConfig(
        context_length=shape("positional_embedding")[0],
        vocab_size=shape("token_embedding.weight")[0],
        width=text_width,
        heads=text_width // 64,
        layers=_count(state_dict, r"transformer\.resblocks\.(\d+)\."),
    )
    projection = state_dict.get("text_projection")
    embed_dim = projection.shape[1] if projection is not None else shape("text_projection.weight")[0]
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        activation=activation,
        logit_bias_init=-10.0 if "logit_bias" in state_dict else None,
    ).validate()


# ----------------------------------------------------------------------------------------------
# open_clip layout <-> Flax variables
# ----------------------------------------------------------------------------------------------
# Each rule maps torch tensors to Flax leaves and back. `to_flax` receives the torch tensors named in
# `torch_keys` and returns {flax_path: array}; `to_torch` receives those Flax leaves and returns the
# torch tensors. Writing both directions side by side keeps the round trip exact by construction.


class _Rule:
    def __init__(
        self,
        torch_keys: list[str],
        flax_paths: list[tuple[str, ...]],
        to_flax: Callable[..., list[np.ndarray]],
        to_torch: Callable[..., list[np.ndarray]],
    ):
        self.torch_keys, self.flax_paths, self.to_flax, self.to_torch = torch_keys, flax_paths, to_flax, to_torch


def _copy(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    return _Rule([torch_key], [flax_path], lambda t: [t], lambda f: [f])


def _transposed(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    return _Rule([torch_key], [flax_path], lambda t: [t.T], lambda f: [f.T])


def _conv(torch_key: str, flax_path: tuple[str, ...]) -> _Rule:
    # torch (out, in, kh, kw) <-> flax (kh, kw, in, out)
    return _Rule([torch_key], [flax_path], lambda t: [t.transpose(2, 3, 1, 0)], lambda f: [f.transpose(3, 2, 0, 1)])


def _layer_norm(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [
        _copy(f"{torch_prefix}.weight", (*flax_prefix, "norm", "scale")),
        _copy(f"{torch_prefix}.bias", (*flax_prefix, "norm", "bias")),
    ]


def _batch_norm(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [
        _copy(f"{torch_prefix}.weight", ("params", *flax_prefix, "scale")),
        _copy(f"{torch_prefix}.bias", ("params", *flax_prefix, "bias")),
        _copy(f"{torch_prefix}.running_mean", ("batch_stats", *flax_prefix, "mean")),
        _copy(f"{torch_prefix}.running_var", ("batch_stats", *flax_prefix, "var")),
    ]


def _fused_attention(torch_prefix: str, flax_prefix: tuple[str, ...], heads: int) -> list[_Rule]:
    """torch in_proj (3W, W) + out_proj (W, W) <-> flax query/key/value (W, heads, head_dim) + out."""
    names = ("query", "key", "value")

    def weights_to_flax(in_proj):
        return [w.T.reshape(w.shape[1], heads, -1) for w in np.split(in_proj, 3, axis=0)]

    def biases_to_flax(in_bias):
        return [b.reshape(heads, -1) for b in np.split(in_bias, 3)]

    return [
        _Rule(
            [f"{torch_prefix}.in_proj_weight"],
            [(*flax_prefix, n, "kernel") for n in names],
            weights_to_flax,
            lambda q, k, v: [np.concatenate([x.reshape(x.shape[0], -1).T for x in (q, k, v)], axis=0)],
        ),
        _Rule(
            [f"{torch_prefix}.in_proj_bias"],
            [(*flax_prefix, n, "bias") for n in names],
            biases_to_flax,
            lambda q, k, v: [np.concatenate([x.reshape(-1) for x in (q, k, v)])],
        ),
        *_attention_output(f"{torch_prefix}.out_proj", flax_prefix, heads),
    ]


def _attention_output(torch_prefix: str, flax_prefix: tuple[str, ...], heads: int) -> list[_Rule]:
    return [
        _Rule(
            [f"{torch_prefix}.weight"],
            [(*flax_prefix, "out", "kernel")],
            lambda w: [w.T.reshape(heads, -1, w.shape[0])],
            lambda k: [k.reshape(-1, k.shape[-1]).T],
        ),
        _copy(f"{torch_prefix}.bias", (*flax_prefix, "out", "bias")),
    ]


def _separate_projection(torch_prefix: str, flax_path: tuple[str, ...], heads: int) -> list[_Rule]:
    """A torch Linear (W, W) <-> a flax DenseGeneral (W, heads, head_dim)."""
    return [
        _Rule(
            [f"{torch_prefix}.weight"],
            [(*flax_path, "kernel")],
            lambda w: [w.T.reshape(w.shape[1], heads, -1)],
            lambda k: [k.reshape(k.shape[0], -1).T],
        ),
        _Rule(
            [f"{torch_prefix}.bias"],
            [(*flax_path, "bias")],
            lambda b: [b.reshape(heads, -1)],
            lambda b: [b.reshape(-1)],
        ),
    ]


def _transformer(torch_prefix: str, flax_prefix: tuple[str, ...], layers: int, heads: int) -> list[_Rule]:
    rules = []
    for i in range(layers):
        t, f = f"{torch_prefix}.resblocks.{i}", (*flax_prefix, f"block_{i}")
        rules += _layer_norm(f"{t}.ln_1", (*f, "ln_1"))
        rules += _fused_attention(f"{t}.attn", (*f, "attn"), heads)
        rules += _layer_norm(f"{t}.ln_2", (*f, "ln_2"))
        rules += [
            _transposed(f"{t}.mlp.c_fc.weight", (*f, "mlp", "fc", "kernel")),
            _copy(f"{t}.mlp.c_fc.bias", (*f, "mlp", "fc", "bias")),
            _transposed(f"{t}.mlp.c_proj.weight", (*f, "mlp", "proj", "kernel")),
            _copy(f"{t}.mlp.c_proj.bias", (*f, "mlp", "proj", "bias")),
        ]
    return rules


def _conv_norm(torch_conv: str, torch_bn: str, flax_prefix: tuple[str, ...]) -> list[_Rule]:
    return [_conv(torch_conv, ("params", *flax_prefix, "conv", "kernel")), *_batch_norm(torch_bn, (*flax_prefix, "bn"))]


def _rules(config: CLIPConfig, state_dict_keys: set[str] | None = None) -> list[_Rule]:
    vision, text = config.vision, config.text
    params = ("params",)
    rules: list[_Rule] = []
    if vision.is_vit:
        v = (*params, "visual")
        rules += [
            _conv("visual.conv1.weight", (*v, "patch_embedding")),
            _copy("visual.class_embedding", (*v, "class_embedding")),
            _copy("visual.positional_embedding", (*v, "positional_embedding")),
            *_layer_norm("visual.ln_pre", (*v, "ln_pre")),
            *_transformer("visual.transformer", (*v, "transformer"), vision.layers, vision.num_heads),
            *_layer_norm("visual.ln_post", (*v, "ln_post")),
            _copy("visual.proj", (*v, "projection")),
        ]
    else:
        rules += _conv_norm("visual.conv1.weight", "visual.bn1", ("visual", "stem1"))
        rules += _conv_norm("visual.conv2.weight", "visual.bn2", ("visual", "stem2"))
        rules += _conv_norm("visual.conv3.weight", "visual.bn3", ("visual", "stem3"))
        in_planes = vision.width
        for stage, depth in enumerate(vision.layers):
            planes = vision.width * 2**stage
            for index in range(depth):
                t, f = f"visual.layer{stage + 1}.{index}", ("visual", f"layer{stage + 1}_{index}")
                for conv in ("conv1", "conv2", "conv3"):
                    rules += _conv_norm(f"{t}.{conv}.weight", f"{t}.bn{conv[-1]}", (*f, conv))
                stride = 2 if (stage > 0 and index == 0) else 1
                if stride > 1 or in_planes != planes * 4:
                    rules += _conv_norm(f"{t}.downsample.0.weight", f"{t}.downsample.1", (*f, "downsample"))
                in_planes = planes * 4
        a = (*params, "visual", "attnpool")
        rules += [
            _copy("visual.attnpool.positional_embedding", (*a, "positional_embedding")),
            *_separate_projection("visual.attnpool.q_proj", (*a, "attn", "query"), vision.num_heads),
            *_separate_projection("visual.attnpool.k_proj", (*a, "attn", "key"), vision.num_heads),
            *_separate_projection("visual.attnpool.v_proj", (*a, "attn", "value"), vision.num_heads),
            *_attention_output("visual.attnpool.c_proj", (*a, "attn"), vision.num_heads),
        ]
    t = (*params, "text")
    # open_clip's own text towers may hold the projection as a Linear ("text_projection.weight").
    if state_dict_keys is not None and "text_projection.weight" in state_dict_keys:
        text_projection = _Rule(["text_projection.weight"], [(*t, "projection")], lambda w: [w.T], lambda p: [p.T])
    else:
        text_projection = _copy("text_projection", (*t, "projection"))
    rules += [
        _copy("token_embedding.weight", (*t, "token_embedding")),
        _copy("positional_embedding", (*t, "positional_embedding")),
        *_transformer("transformer", (*t, "transformer"), text.layers, text.heads),
        *_layer_norm("ln_final", (*t, "ln_final")),
        text_projection,
        _copy("logit_scale", (*params, "logit_scale")),
    ]
    if config.logit_bias_init is not None:
        rules.append(_copy("logit_bias", (*params, "logit_bias")))
    return rules


def _expected_shapes(config: CLIPConfig) -> FlatVariables:
    unscanned = CLIP(config.replace(scan_layers=False, remat_policy="none"))
    shapes = jax.eval_shape(lambda: unscanned.init_variables(jax.random.key(0)))
    return traverse_util.flatten_dict(nn.unbox(shapes))


def openclip_to_variables(state_dict: StateDict, config: CLIPConfig) -> dict[str, Any]:
    """Flax variables ({"params", ["batch_stats"]}) of numpy arrays from an open_clip-layout state dict.

    Raises ConversionError naming the first missing or mis-shaped tensor, or the tensors left unused.
    """
    expected = _expected_shapes(config)
    flat: FlatVariables = {}
    used: set[str] = set()
    for rule in _rules(config, set(state_dict)):
        missing = [k for k in rule.torch_keys if k not in state_dict]
        if missing:
            tower = "ViT" if config.vision.is_vit else "ModifiedResNet"
            raise ConversionError(f"missing tensor {missing[0]!r} (needed by a {tower} CLIP)")
        inputs = [np.asarray(state_dict[k], dtype=np.float32) for k in rule.torch_keys]
        try:
            outputs = rule.to_flax(*inputs)
        except ValueError as error:  # a reshape that the shape cannot satisfy
            raise ConversionError(
                f"tensor {rule.torch_keys[0]!r} has shape {tuple(inputs[0].shape)}, which does not fit the model"
            ) from error
        for path, value in zip(rule.flax_paths, outputs):
            if path not in expected:
                raise ConversionError(f"internal: no parameter {'/'.join(path)} in the model")
            want = tuple(expected[path].shape)
            if tuple(value.shape) != want:
                raise ConversionError(
                    f"tensor {rule.torch_keys[0]!r} has shape {tuple(inputs[0].shape)}; the model needs "
                    f"{'/'.join(path)} of shape {want}"
                )
            flat[path] = np.array(value, order="C")
        used.update(rule.torch_keys)
    unused = sorted(k for k in state_dict if k not in used and not _IGNORED_KEYS.search(k))
    if unused:
        raise ConversionError(f"tensors not used by the model: {unused[:10]}{' …' if len(unused) > 10 else ''}")
    not_filled = sorted("/".join(p) for p in expected if p not in flat)
    if not_filled:
        raise ConversionError(f"internal: model parameters not filled: {not_filled[:5]}")
    if config.scan_layers:
        flat = stack_layers(flat)
    return traverse_util.unflatten_dict(flat)


def variables_to_openclip(variables: dict[str, Any], config: CLIPConfig) -> StateDict:
    """The inverse of `openclip_to_variables`: an open_clip-layout state dict of float32 numpy arrays.

    BatchNorm's `num_batches_tracked` counters are written as 0: they count training steps, are unused
    when the momentum is set (as in CLIP), and Flax keeps no such counter.
    """
    if config.decoder is not None or config.bag_of_words:
        # open_clip's CLIP has no place for them, and its CoCa's decoder is laid out differently: a
        # state dict without them would silently lose part of the model.
        raise ConversionError(
            "cannot export a model with a caption decoder or bag-of-words head to open_clip's CLIP layout"
        )
    flat = traverse_util.flatten_dict(nn.unbox(dict(variables)))
    flat = {path: np.asarray(jax.device_get(value), dtype=np.float32) for path, value in flat.items()}
    if config.scan_layers:
        flat = unstack_layers(flat)
    state_dict: StateDict = {}
    for rule in _rules(config):
        outputs = rule.to_torch(*[flat[p] for p in rule.flax_paths])
        for key, value in zip(rule.torch_keys, outputs):
            state_dict[key] = np.array(value, order="C")
        for key in rule.torch_keys:
            if key.endswith(".running_var"):
                state_dict[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state_dict


# ----------------------------------------------------------------------------------------------
# A state dict and its model config
# ----------------------------------------------------------------------------------------------


def convert_state_dict(
    state_dict: StateDict, model: str | CLIPConfig | None = None, activation: str | None = None, **overrides: Any
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(model_config, variables) for an open_clip-layout state dict; the model config from `model` or read off the shapes."""
    if isinstance(model, CLIPConfig):
        config = model
    elif model is not None:
        config = get_model_config(model)
    else:
        config = infer_config(state_dict, activation or "gelu")
    if activation is not None:
        config = config.replace(activation=activation)
    if overrides:
        config = config.replace(**overrides)
    return config, openclip_to_variables(state_dict, config)
